"""Hub datasets as corpora, read where they live: ``hf://datasets/ORG/NAME[@REVISION]/PATTERN``.

``PATTERN`` names files of the dataset repo as a corpus glob names files of a folder: a file
(``data/train-00000.parquet``), a folder, read whole (``sample/10BT``), or a glob
(``data/*/*.parquet``, ``**/*.jsonl.zst``; a matched folder is read whole); empty, the whole repo.
Of what it names, only parquet and JSON-lines shards (plain or compressed, as ``refine.core.corpus``
reads them) are read, in sorted path order; hidden files and everything else (``README.md``, loading
scripts) are left out. ``REVISION`` is a branch, a tag or a commit (``refs%2Fpr%2F1`` for a pull
request, as huggingface_hub's file system spells it); ``main`` when left out. Ids and names are as
for local files (``<name>`` relative to the pattern's folder part).

Where the hub can be reached, the revision is resolved to its commit once per process (every read of
a run sees the same files, even if the branch moves meanwhile) and the shards are listed there; a
shard is then read from the hub cache when that commit's copy is there, else streamed through
huggingface_hub's file system in blocks (parquet by row group, JSON lines by line): memory stays
flat in corpus size and nothing is downloaded whole. Offline (``HF_HUB_OFFLINE=1``), or when the
hub cannot be reached, it is read from the hub cache: the ref's commit (``refs/<revision>``) and the
files of that snapshot, which are only those that were downloaded (``hf download ORG/NAME
--repo-type dataset``). A cached file is read only when it is a regular file or a link to a regular
file directly inside the repo's real ``blobs/`` (``refine.core.read_guard.hub_snapshot_file``); any
other link, FIFO or device is skipped and counted, as in a local folder.

``fingerprint``: the repo, the commit and the shards' paths and sizes, so a changed corpus (a new
commit on the branch, another pattern) is packed and scored again, without reading a shard first.

A malformed address, a dataset, revision or file that is not there (on the hub or, offline, in the
cache), or a pattern that names no shard: one ``InputError`` line naming what was asked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from urllib.parse import unquote

from refine.core.corpus_formats import JSONL_SUFFIXES, PARQUET_SUFFIXES, strip_suffixes, suffixes
from refine.core.errors import InputError
from refine.core.hub import COMMIT, hub_cache, is_revision, offline, repo_cache
from refine.core.read_guard import hub_snapshot_file, is_link_below, kind

PREFIX = "hf://"
ADDRESS = re.compile(r"hf://(?P<type>[^/]*)/(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"
                     r"(?:@(?P<revision>[^/]*))?(?:/(?P<pattern>.*))?")
FORM = ("hf://datasets/ORG/NAME[@REVISION]/PATTERN "
        "(e.g. hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT)")
GLOB_CHARS = frozenset("*?[")
READ_BUFFER = 1 << 16       # for bounded line reads; the file system fetches and keeps blocks


@dataclass(frozen=True)
class HubCorpus:
    url: str
    repo: str
    revision: str | None        # None: the default branch
    pattern: str                # "": the whole repo


@dataclass(frozen=True)
class HubFile:
    """A shard on the hub, read through a file system (huggingface_hub's) in blocks: seekable, for
    parquet's footer and row groups, and never fetched whole. The corpus readers open it as they
    open a ``Path``."""

    fs: object
    fs_path: str                # datasets/ORG/NAME@<commit>/<path in repo>
    size: int
    url: str                    # what error lines name

    @property
    def name(self) -> str:
        return PurePosixPath(self.fs_path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.fs_path).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.fs_path).stem

    def open(self, mode: str = "rb"):
        # buffered: the file system's own file reads a line only whole (its readline takes no size)
        return io.BufferedReader(self.fs.open(self.fs_path, "rb"), buffer_size=READ_BUFFER)

    def stat(self):
        return SimpleNamespace(st_size=self.size)

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class _Listing:
    commit: str
    files: dict[str, int | None]    # path in repo -> size (None in the cache: the file's own)
    online: bool


class _Unreachable(Exception):
    pass


def is_hub_corpus(path) -> bool:
    return str(path).startswith(PREFIX)


def parse(url: str) -> HubCorpus:
    m = ADDRESS.fullmatch(str(url))
    if m is None or m["type"] != "datasets":
        raise InputError(f"{str(url)[:200]}: not a hub corpus address; one is {FORM}")
    revision = None if m["revision"] is None else unquote(m["revision"])
    if revision is not None and not is_revision(revision):
        raise InputError(f"{url}: {revision[:100]!r} is not a hub revision (a branch or tag name, "
                         f"or a commit hash; no '..', no leading '/' or '.', no empty part)")
    pattern = (m["pattern"] or "").strip("/")
    if any(part in (".", "..") for part in pattern.split("/")):
        raise InputError(f"{url}: the pattern {pattern!r} steps out of the repo ('.' or '..')")
    return HubCorpus(str(url), m["repo"], revision, pattern)


def corpus_units(url: str, stats) -> list[tuple[Path | HubFile, str]]:
    """What ``refine.core.corpus.iter_documents`` reads of ``url``: (a cached file or a
    ``HubFile``, its name), in order; skipped cache entries counted in ``stats``."""
    return [(unit, name) for _, unit, name in _units(parse(url), stats)[1]]


def fingerprint(url: str) -> str:
    """sha256 of the repo, the resolved commit and the shards read (paths, sizes); none is read."""
    c = parse(url)
    listing, units = _units(c, SimpleNamespace(skipped_links=0, skipped_special=0))
    files = [(p, u.stat().st_size) for p, u, _ in units]
    key = {"hub": f"datasets/{c.repo}", "commit": listing.commit, "files": files}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _units(c: HubCorpus, stats) -> tuple[_Listing, list[tuple[str, Path | HubFile, str]]]:
    listing = _listing(c)
    snapshot = repo_cache(c.repo, "dataset") / "snapshots" / listing.commit
    fs = None
    units = []
    for p in _selected(listing.files, c.pattern):
        local = snapshot / p
        # online, the cache is only a copy: a cached file that is no sound blob is streamed instead
        if not listing.online or os.path.lexists(local):
            if _cached(local, snapshot, stats, count=not listing.online):
                units.append((p, local, _name(p, c.pattern)))
                continue
            if not listing.online:
                continue
        if fs is None:
            from huggingface_hub import HfFileSystem

            fs = HfFileSystem()
        fs_path = f"datasets/{c.repo}@{listing.commit}/{p}"
        remote = HubFile(fs, fs_path, listing.files[p], f"{PREFIX}{fs_path}")
        units.append((p, remote, _name(p, c.pattern)))
    if not units:
        include = f" --include {c.pattern!r}" if c.pattern else ""
        where = "on the hub" if listing.online else (
            f"in the hub cache {hub_cache()} (offline: only what was downloaded is there; fetch "
            f"it with `hf download {c.repo} --repo-type dataset{_revision_flag(c)}{include}`)")
        skipped = stats.skipped_links + stats.skipped_special
        raise InputError(f"{c.url}: no parquet or JSON-lines shard of {c.repo} at "
                         f"{c.revision or 'main'} ({listing.commit[:12]}) matches "
                         f"{c.pattern or 'the repo'!r} {where}"
                         f"{f' ({skipped} links, FIFOs or devices skipped)' if skipped else ''}")
    return listing, units


def _revision_flag(c: HubCorpus) -> str:
    return f" --revision {c.revision}" if c.revision else ""


def _cached(p: Path, snapshot: Path, stats, count: bool) -> bool:
    """``p`` in the cache's snapshot is readable: a regular file, or a link to a blob of this repo
    (``hub_snapshot_file``); anything else is counted in ``stats`` (when ``count``), not read."""
    if p.is_symlink():
        if hub_snapshot_file(p, snapshot) is not None:
            return True
        stats.skipped_links += int(count)
        return False
    if kind(p) == "a regular file" and not is_link_below(p.parent, snapshot):
        return True
    if is_link_below(p.parent, snapshot):
        stats.skipped_links += int(count)
    else:
        stats.skipped_special += int(count)
    return False


def _selected(files, pattern: str) -> list[str]:
    """The paths of ``files`` that ``pattern`` names (see the module docstring): shards only,
    hidden ones left out, sorted."""
    if not pattern:
        chosen = list(files)
    elif GLOB_CHARS.intersection(pattern):
        # the glob dialect of huggingface_hub's file system (fsspec's)
        from fsspec.utils import glob_translate

        rx = re.compile(glob_translate(pattern))
        chosen = [p for p in files if any(rx.match(q) for q in _with_folders(p))]
    else:
        chosen = [p for p in files if p == pattern or p.startswith(pattern + "/")]
    return sorted(p for p in chosen
                  if not any(part.startswith(".") for part in p.split("/")) and _is_shard(p))


def _with_folders(p: str) -> list[str]:
    """``a/b/c`` -> ``a/b/c``, ``a/b``, ``a``: a pattern matching a folder names all inside it."""
    parts = p.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _is_shard(p: str) -> bool:
    fmt, compression = suffixes(PurePosixPath(p))
    return fmt in JSONL_SUFFIXES or (fmt in PARQUET_SUFFIXES and not compression)


def _base(pattern: str) -> str:
    """The folder part of a pattern: names are relative to it (a folder named: that folder)."""
    if not GLOB_CHARS.intersection(pattern):
        return pattern
    fixed = []
    for part in pattern.split("/")[:-1]:
        if GLOB_CHARS.intersection(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def _name(p: str, pattern: str) -> str:
    if p == pattern:                                # a file named: its stem, as a local file's
        return strip_suffixes(PurePosixPath(PurePosixPath(p).name)).as_posix()
    base = _base(pattern)
    rel = PurePosixPath(p).relative_to(base) if base else PurePosixPath(p)
    return strip_suffixes(rel).as_posix()


def _listing(c: HubCorpus) -> _Listing:
    if not offline():
        try:
            commit, files = _listed_online(c.url, c.repo, c.revision, _listing_root(c.pattern))
            return _Listing(commit, dict(files), online=True)
        except _Unreachable as e:
            listing = _listed_cached(c, f"the hub cannot be reached ({e})")
            print(f"note: {c.url}: the hub cannot be reached ({e}); reading the hub cache's "
                  f"snapshot {listing.commit[:12]}", file=sys.stderr, flush=True)
            return listing
    return _listed_cached(c, "the hub is offline here (HF_HUB_OFFLINE=1)")


def _listing_root(pattern: str) -> str | None:
    """The folder to list on the hub: the pattern's fixed folders (a file or folder named: its
    parent)."""
    glob = GLOB_CHARS.intersection(pattern)
    base = _base(pattern) if glob else "/".join(pattern.split("/")[:-1])
    return base or None


def _unreachable(e: BaseException) -> bool:
    # huggingface_hub's HTTP client raises its own TransportError family (no route, DNS, timeouts);
    # its offline switch, a ConnectionError
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        t.__name__ == "TransportError" for t in type(e).__mro__)


@lru_cache(maxsize=32)
def _listed_online(url: str, repo: str, revision: str | None, root: str | None
                   ) -> tuple[str, tuple[tuple[str, int], ...]]:
    """The commit ``revision`` is at and the files under ``root`` there (once per process: every
    read of one run sees the same commit)."""
    from huggingface_hub import HfApi, RepoFile
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi()
    try:
        commit = api.dataset_info(repo, revision=revision).sha
        if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
            raise InputError(f"{url}: the hub gave no commit for {repo} at {revision or 'main'}")
        try:
            tree = api.list_repo_tree(repo, path_in_repo=root, recursive=True, revision=commit,
                                      repo_type="dataset")
            files = tuple((e.path, e.size) for e in tree if isinstance(e, RepoFile))
        except EntryNotFoundError:
            files = ()
    except GatedRepoError:
        raise InputError(f"{url}: {repo} is gated: accept its terms on the hub and log in "
                         f"(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise InputError(f"{url}: no dataset {repo} on the hub (or it is private: log in with "
                         f"`hf auth login`)") from None
    except RevisionNotFoundError:
        raise InputError(f"{url}: no revision {revision!r} of {repo} on the hub") from None
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the HTTP client's errors: unreachable, or one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _unreachable(e):
            raise _Unreachable(first) from None
        if isinstance(e, (HfHubHTTPError, OSError, ValueError)):
            raise InputError(f"{url}: cannot list {repo} on the hub: {first}") from None
        raise
    return commit, files


def _listed_cached(c: HubCorpus, why: str) -> _Listing:
    """The commit of ``c``'s revision in the hub cache and the files of its snapshot there."""
    repo = repo_cache(c.repo, "dataset")
    fetch = (f"fetch it where there is a network "
             f"(`hf download {c.repo} --repo-type dataset{_revision_flag(c)}`)")
    if kind(repo) != "a folder" or is_link_below(repo, hub_cache()):
        raise InputError(f"{c.url}: {c.repo} is not in the hub cache {hub_cache()}, and {why}; "
                         f"{fetch}")
    revision = c.revision or "main"
    snapshots = repo / "snapshots"
    commit = None
    if COMMIT.fullmatch(revision) and kind(snapshots / revision) == "a folder":
        commit = revision
    else:
        ref = repo / "refs" / revision
        if kind(ref) != "a regular file" or is_link_below(ref.parent, repo):
            refs = repo / "refs"
            cached = sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*")
                            if p.is_file()) if kind(refs) == "a folder" else []
            raise InputError(f"{c.url}: revision {revision!r} of {c.repo} is not in the hub cache "
                             f"{hub_cache()} (cached: {', '.join(cached) or 'none'}), and {why}; "
                             f"{fetch}")
        with open(ref, "rb") as fh:
            commit = fh.read(256).decode("utf-8", "replace").strip()
        if not COMMIT.fullmatch(commit):
            raise InputError(f"{ref}: not a commit hash; fix or delete the repo's refs/ in the "
                             f"cache")
    snapshot = snapshots / commit
    if kind(snapshot) != "a folder" or is_link_below(snapshot, hub_cache()):
        raise InputError(f"{c.url}: the hub cache's snapshot {snapshot} is not a folder inside "
                         f"{snapshots}, and {why}; {fetch}")
    files: dict[str, int | None] = {}
    for top, dirs, names in os.walk(snapshot):      # not into linked folders: counted, not read
        for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            files[Path(top, name).relative_to(snapshot).as_posix()] = None
    return _Listing(commit, files, online=False)
