"""Hub model ids (``org/name[@revision]``) as local folders, through huggingface_hub's cache.

Every model or tokenizer path goes through ``local_model``: a local folder is used as it is; anything else
that reads as a hub id is downloaded (or, offline, found) in the hub cache (``HF_HOME`` / ``HF_HUB_CACHE``).
Only configs, tokenizers and safetensors weights are fetched: pickled ``*.bin`` weights are never loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from refine.core.errors import InputError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
# what a causal LM and its tokenizer need; no pickles (*.bin, *.pt) and no other formats' copies
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache() -> Path:
    """The hub cache huggingface_hub uses, read from the environment at call time (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def hub_id(path: str | Path) -> tuple[str, str | None] | None:
    """``(repo, revision)`` when ``path`` is a hub id rather than a local path, else None. A path whose first
    component exists here (``runs/reference``) or that starts with ``.``, ``/`` or ``~`` is local."""
    s = str(path)
    m = HUB_ID.fullmatch(s)
    if m is None or Path(s.split("/")[0]).exists():
        return None
    return m["repo"], m["revision"]


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
        raise InputError(f"{path}: not in the hub cache {hub_cache()}; {how}") from None
    except RepositoryNotFoundError:
        raise InputError(f"{path}: no such model on the hub (or it is private: log in with `hf auth login`)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot fetch from the hub: {str(e).splitlines()[0]}") from None
    return Path(folder)


def hub_blob_link(p: Path) -> bool:
    """``p`` is a file of a hub cache snapshot: a link from ``<repo>/snapshots/<rev>/...`` to a file in
    ``<repo>/blobs/`` (how ``huggingface_hub`` lays out every downloaded repo, datasets included)."""
    parts = p.absolute().parts
    if not p.is_symlink() or "snapshots" not in parts[:-2]:
        return False
    repo = Path(*parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
    target = p.resolve()
    return target.is_file() and target.parent == (repo / "blobs").resolve()
