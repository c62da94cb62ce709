"""Artifacts on disk: atomic writes, content hashes and ``manifest.json`` files.

Every stage writes its outputs to a temporary name, fsyncs, then renames, so a half-written artifact is never
mistaken for a finished one. A stage's ``manifest.json`` (inputs and their hashes, resolved config, code
version, counts, timings) is written last; a stage whose manifest matches its inputs is skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success fsync it and rename it over ``final``.

    Works for a file or a directory written at the temporary path. On an exception the temporary is removed.
    The temporary lives in a private folder ``.{name}.tmp-{random}`` made with ``mkdtemp`` (exclusive, mode
    0700, an unpredictable name: a link planted at a guessed name is never written through); the rename
    replaces a link at ``final`` itself, never its target. The writer holds an ``flock`` on the folder's
    ``.lock`` until it is done, which is how the stale-temporary sweep tells a live writer from a dead one
    (a kill -9 releases it), whatever host names and pids containers sharing a folder have.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final.parent)
    box = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # locked before it is named .lock, so a sweep never finds an unlocked .lock of a live writer
    lock = os.open(box / ".lock-new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.rename(box / ".lock-new", box / LOCK)
    tmp = box / final.name
    try:
        yield tmp
        if tmp.is_symlink() or not tmp.exists():
            raise FileNotFoundError(f"atomic_path: nothing (or a link) was written at {tmp}")
        if tmp.is_dir():
            for p in sorted(tmp.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    with open(p, "rb+") as f:
                        os.fsync(f.fileno())
            if final.is_symlink():
                final.unlink()                     # a directory cannot be renamed over a link; never follow it
            if final.is_dir():
                final.rename(box / OLD)            # killed before the next rename: the sweep puts it back
                tmp.rename(final)
            else:
                tmp.rename(final)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(final)            # a failed write() names no file: the error line names this one
        raise
    finally:
        if (box / OLD).is_dir() and not final.exists() and not final.is_symlink():
            (box / OLD).rename(final)              # failed between the two renames: keep the old data
        shutil.rmtree(box, ignore_errors=True)
        os.close(lock)


LOCK, OLD = ".lock", ".old"
_SWEPT: set[Path] = set()
_SWEEP_LOCK = threading.Lock()


def _remove_stale(folder: Path) -> None:
    """Temporaries in ``folder`` whose writer is gone (a kill -9 or a power cut mid-write): nobody holds their
    ``.lock``. A live writer's (a parallel job, another container's, this process's) stay. Once per folder
    per process: a scan costs O(entries), so scanning at every write would make writing N shards into one
    folder O(N^2)."""
    with _SWEEP_LOCK:
        if folder in _SWEPT:
            return
        _SWEPT.add(folder)
        for box in folder.glob(".*.tmp-*"):
            if box.is_symlink() or not box.is_dir():
                continue
            try:
                fd = os.open(box / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:                        # no lock (yet, or a stranger's folder): not ours to judge
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue                           # its writer is alive
            try:
                final = folder / box.name[1:box.name.rindex(".tmp-")]
                if (box / OLD).is_dir() and not final.exists() and not final.is_symlink():
                    (box / OLD).rename(final)      # killed between the two renames: the old one is the data
                shutil.rmtree(box, ignore_errors=True)
            finally:
                os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def code_version() -> str:
    """Git commit of this checkout (with ``-dirty`` if modified), or ``unknown`` outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def manifest_matches(folder: str | Path, key: dict) -> bool:
    """True if ``folder`` holds a finished stage whose recorded ``key`` (inputs + config) equals ``key``."""
    m = read_manifest(folder)
    return m is not None and m.get("key") == json.loads(json.dumps(key, sort_keys=True, default=str))


def write_manifest(folder: str | Path, key: dict, **info: Any) -> dict:
    """Write ``manifest.json`` last: ``key`` decides whether a rerun may skip; ``info`` is provenance."""
    manifest = {"key": key, "code_version": code_version(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **info}
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest
