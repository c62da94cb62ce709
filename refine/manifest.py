"""Artifacts on disk: atomic writes, content hashes and ``manifest.json`` files.

Every stage writes its outputs to a temporary name, fsyncs, then renames, so a half-written artifact is never
mistaken for a finished one. A stage's ``manifest.json`` (inputs and their hashes, resolved config, code
version, counts, timings) is written last; a stage whose manifest matches its inputs is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
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
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final.parent)
    tmp = final.with_name(f".{final.name}.tmp-{_HOST}-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir():
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    with open(p, "rb+") as f:
                        os.fsync(f.fileno())
            if final.is_dir():
                old = final.with_name(f".{final.name}.old-{_HOST}-{os.getpid()}")
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
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
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


_HOST = socket.gethostname().replace("-", "_")
_SWEPT: set[Path] = set()
_SWEEP_LOCK = threading.Lock()


def _remove_stale(folder: Path) -> None:
    """Temporaries in ``folder`` left by processes of this host that no longer exist (a kill -9 or a power cut
    mid-write); a live writer's (a parallel job, or this process) stay, and so do other hosts' in a shared
    folder. Once per folder per process: a scan costs O(entries), so scanning at every write would make
    writing N shards into one folder O(N^2)."""
    with _SWEEP_LOCK:
        if folder in _SWEPT:
            return
        _SWEPT.add(folder)
        for stale in folder.glob(f".*-{_HOST}-*"):
            rest, _, pid = stale.name.rpartition(f"-{_HOST}-")
            name, _, kind = rest[1:].rpartition(".")          # ".{name}.{kind}-{host}-{pid}"
            if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
                continue
            final = folder / name
            if kind == "old" and not final.exists():
                stale.rename(final)                # killed between the two renames: the old one is the data
            elif stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                        # another user's process
        pass
    return True


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def code_version() -> str:
    """Git commit of this checkout (with ``-dirty`` if modified), or ``unknown`` outside git."""
    root = Path(__file__).resolve().parent.parent
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
