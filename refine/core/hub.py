"""Hub model ids (``org/name[@revision]``) as local folders, through huggingface_hub's cache.

Every model or tokenizer path goes through ``local_model``: a local folder is used as it is; anything else
that reads as a hub id is downloaded (or, offline, found) in the hub cache (``HF_HOME`` / ``HF_HUB_CACHE``).
Only configs, tokenizers and safetensors weights are fetched: pickled ``*.bin`` weights are never loaded.
A hub id is exactly ``org/name`` with an optional ``@revision`` that is a branch or tag name or a commit hash
(``hub_id``: ``org/name@../../x`` is one error line, ``runs/x`` is a local path); the folder found in the cache
must be one of that repo's ``snapshots/`` (a ref file in the cache cannot send it elsewhere). Reading a cached
dataset's snapshot links as a corpus: ``refine.core.read_guard.hub_snapshot_file``; a hub dataset
named ``hf://datasets/...`` as a corpus: ``refine.core.hub_corpus``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from refine.core.errors import InputError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>.*))?")
# a branch or tag name (``main``, ``v1.0``, ``refs/pr/1``: components not starting with ``.``, no ``..``) or a commit
REVISION = re.compile(r"[\w-][\w.-]*(?:/[\w-][\w.-]*)*")
# first folders that name this project's (and Hydra's) own output, never a hub organisation: local even if missing
LOCAL_PREFIXES = frozenset({"runs", "outputs", "multirun", "checkpoints"})
# what a causal LM and its tokenizer need; no pickles (*.bin, *.pt) and no other formats' copies
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
COMMIT = re.compile(r"[0-9a-f]{40}")    # a ref file's content in the cache; a snapshot's name


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache() -> Path:
    """The hub cache huggingface_hub uses, read from the environment at call time (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def hub_id(path: str | Path) -> tuple[str, str | None] | None:
    """``(repo, revision)`` when ``path`` is a hub id rather than a local path, else None.

    A hub id is exactly ``org/name`` (two components) with an optional ``@revision``. Local: more components
    (``a/b/c``), a start with ``.``, ``/`` or ``~``, a first component that exists here (``runs/reference``) or
    that names this project's output (``LOCAL_PREFIXES``: ``runs/x`` is a run folder even before ``runs/``
    exists; the caller then says it is not found). InputError for a revision that is neither a branch or tag name
    nor a commit hash (``org/name@../../x`` would read any file as a ref)."""
    s = str(path)
    m = HUB_ID.fullmatch(s)
    first = s.split("/")[0]
    if m is None or first in LOCAL_PREFIXES or Path(first).exists():
        return None
    revision = m["revision"]
    if revision is not None and not is_revision(revision):
        raise InputError(f"{s}: {revision[:100]!r} is not a hub revision (a branch or tag name, or a commit hash; "
                         f"no '..', no leading '/' or '.', no empty part)")
    return m["repo"], revision


def is_revision(revision: str) -> bool:
    """A branch or tag name or a commit hash, safe to join to a cache's ``refs/`` (no ``..``, no
    leading ``/``)."""
    return (bool(REVISION.fullmatch(revision)) and ".." not in revision
            and not revision.endswith(".lock"))


def repo_cache(repo: str, repo_type: str = "model") -> Path:
    """The folder huggingface_hub keeps ``repo`` in: ``<hub cache>/<type>s--<org>--<name>``."""
    return hub_cache() / f"{repo_type}s--{repo.replace('/', '--')}"


def local_model(path: str | Path) -> Path:
    """A local folder for ``path``: the folder itself, or a hub id's snapshot in the hub cache."""
    parsed = hub_id(path)
    if parsed is None:
        return Path(path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, revision = parsed
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=hub_cache(), allow_patterns=MODEL_FILES,
                                   local_files_only=offline())
    except LocalEntryNotFoundError:
        how = ("the hub is offline here (HF_HUB_OFFLINE=1): fetch it where there is a network "
               f"(`hf download {repo}`) into this cache, or give a local folder") if offline() else \
              "and the hub could not be reached"
        raise InputError(f"{path}: no local folder by that name, and not in the hub cache {hub_cache()}; {how}"
                         ) from None
    except RepositoryNotFoundError:
        raise InputError(f"{path}: no such model on the hub (or it is private: log in with `hf auth login`)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot fetch from the hub: {str(e).splitlines()[0]}") from None
    return _checked_snapshot(path, repo, Path(folder))


def _checked_snapshot(path, repo: str, folder: Path) -> Path:
    """``folder`` is a folder directly inside the repo's ``snapshots/`` (a ref file in the cache holding
    ``../../x`` or ``/etc`` makes huggingface_hub return that folder)."""
    snapshots = hub_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
    if folder.name in ("", ".", "..") or not folder.is_dir() or folder.resolve().parent != snapshots.resolve():
        raise InputError(f"{path}: the hub cache's snapshot {str(folder)[:200]} is not a folder inside {snapshots}; "
                         f"fix or delete the repo's refs/ in the cache")
    return folder

