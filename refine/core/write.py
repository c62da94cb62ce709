"""The one layer that writes into output and run folders: refine's ``out=`` and cache folders, training run
folders, reports. Every file put there is written by one of these:

- ``atomic_path(final)`` / ``write_json_atomic(path, obj)``: a file or folder written at a temporary and renamed
  over ``final``; every finished output (shards, manifests, instances, checkpoints, ``latest``, reports, plots).
- ``open_append(path)``: an append-only log (``logs/<name>.log``, ``metrics.jsonl``).
- ``FolderLock(folder, ...)``: ``<folder>/.writer.lock``, one writer per folder on one host.
- ``claim_json(path, obj)``: a record created exclusively (``scoring.json``, a pass's ``key.json``).

What they guarantee, whoever else can write the folder (shared storage, another account, a planted file):

- Nothing is written through a link planted in the folder. ``atomic_path`` writes in a private folder
  (``mkdtemp``: created exclusively, mode 0700, an unpredictable name) and its rename replaces a link at the final
  name, never its target; ``open_append`` and ``FolderLock`` open with ``O_NOFOLLOW``; ``claim_json`` writes its
  temporary in such a private folder. A link where a log or the lock goes is refused with one ``InputError`` line
  (remove it and rerun), as is anything there that is not a regular file (a FIFO, a device, a folder: it is
  checked with ``fstat`` after an ``O_NONBLOCK`` open, so a FIFO never blocks the run); the link's target is
  never opened for writing, let alone truncated.
- A finished output is never half-written: readers see the previous version or the new one, and a writer killed
  mid-write (kill -9, power cut) leaves a temporary that the next writer sweeps (``_remove_stale``: nobody holds its
  ``.lock``). A write that fails (full disk, file-size limit) names the path it was writing
  (``refine.core.errors.write_error_line``).

Writes *inside* an ``atomic_path`` temporary need none of this and open plain paths (``open(tmp / "tokens.bin",
"wb")``, ``save_pretrained(tmp)``, ``np.save``, ``torch.save``, ``dcp.save``, ``refine.core.doc_index``'s
writer): that folder is private to this process from its creation, so nothing can have been planted in it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from refine.core.errors import InputError

LOCK, OLD = ".lock", ".old"               # inside an atomic_path temporary's private folder
LOCK_NAME = ".writer.lock"                # a folder's writer lock (FolderLock)
HOST = socket.gethostname()
_SWEPT: set[Path] = set()
_SWEEP_LOCK = threading.Lock()


# ---- atomic files and folders ----

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_box(final: Path) -> tuple[Path, int]:
    """A private folder ``.{name}.tmp-{random}`` next to ``final`` and the fd of its flocked ``.lock``."""
    _remove_stale(final.parent)
    box = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # locked before it is named .lock, so a sweep never finds an unlocked .lock of a live writer
    lock = os.open(box / ".lock-new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.rename(box / ".lock-new", box / LOCK)
    return box, lock


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
    box, lock = _private_box(final)
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


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# ---- files written in place: appended logs, the writer lock ----

# what opening something other than a regular file gives: a link (ELOOP; EMLINK on the BSDs), a FIFO with no reader
# or a socket (ENXIO), a folder (EISDIR), a device without a driver (ENODEV)
_NOT_A_FILE = (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR, errno.ENODEV)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refusal(path: Path, kind: str, hint: str = "") -> InputError:
    return InputError(f"{path} is {kind}, not a file of this folder's own: refusing to write through it; remove "
                      f"it and rerun{f', or {hint}' if hint else ''}")


def _not_plain(path: Path, hint: str = "") -> InputError | None:
    """The refusal when ``path`` is a link or anything but a regular file; None when it is one, or absent."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return None if stat.S_ISREG(mode) else _refusal(path, _kind(mode), hint)


def check_plain(path: str | Path, hint: str = "") -> None:
    """Refuse (one ``InputError`` line) when ``path`` is a link or anything but a regular file; absent is fine.
    For a file read before it is rewritten or appended to (``metrics.jsonl`` on resume, a claimed record)."""
    refusal = _not_plain(Path(path), hint)
    if refusal is not None:
        raise refusal


def _open_own(path: Path, flags: int, mode: int, hint: str = "") -> int:
    """``os.open`` that never follows a link at ``path`` and never hands back anything but a regular file: a FIFO
    is opened non-blocking (no reader: ENXIO; a reader: refused below), so it never stops the run."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        refusal = _not_plain(path, hint) if e.errno in _NOT_A_FILE else None
        if refusal is None:
            raise
        raise refusal from None
    st_mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(st_mode):
        os.close(fd)
        raise _refusal(path, _kind(st_mode), hint)
    os.set_blocking(fd, True)                  # a regular file: back to the usual blocking writes
    return fd


def open_append(path: str | Path, errors: str = "strict") -> IO[str]:
    """``path`` opened to append text (created if absent, UTF-8). A link or anything but a regular file there is
    refused with one ``InputError`` line; what a link points to is never opened."""
    fd = _open_own(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    return os.fdopen(fd, "a", encoding="utf-8", errors=errors)


class FolderLock:
    """Writers of one folder on one host know of each other: an ``flock`` on ``<folder>/.writer.lock``.

    ``with FolderLock(folder, "refine run", hint="use another out="):`` refuses with one line when held.

    flock, because the kernel drops it when its holder dies (kill -9, OOM): a dead run's lock is taken over by
    the next one with no clean-up step and no pid guessing. The file's text (one ``host pid mode`` line per
    holder) only serves to name the holder in the refusal. The file is opened with ``O_NOFOLLOW`` and must be a
    regular file: a link planted there is refused and its target never opened (an exclusive holder truncates
    the lock file: through a link, that emptied whatever file the link named).

    Two modes. Exclusive: a writer that owns the whole folder (an unsharded refine run, the finishing step,
    re-selection, ``overwrite=true``, a trainer). Shared: refine's shard parts (``--shard i/N``), which by design
    write disjoint shard files into one folder at the same time; that they score the same configuration is what
    the folder's key files check (``refine.__main__``), not the lock. So parts run together, and a finisher or an
    overwrite waits until no part on this host is running.

    Across machines on shared storage this lock is not relied on: Linux emulates flock on NFS with byte-range
    locks, which reach other clients only where the lock daemon works. There the key checks do the work (docs/scale.md).
    """

    def __init__(self, folder: str | Path, what: str, hint: str, shared: bool = False):
        self.folder, self.what, self.hint, self.shared = Path(folder), what, hint, shared
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = _open_own(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644, self.hint)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = _holders(fd)
            os.close(fd)
            raise InputError(f"{self.folder} is being written by another {self.what} ({holders}); wait for it to "
                             f"end, or {self.hint}") from None
        if not self.shared:
            os.ftruncate(fd, 0)            # alone: the lines of earlier holders are history
        self._line = f"{HOST} {os.getpid()} {'shared' if self.shared else 'exclusive'}\n"
        os.write(fd, self._line.encode())
        self._fd = fd
        return self

    def take_whole(self) -> bool:
        """A shared holder (the last part of a sharded run, about to finish it) asks for the folder alone: True
        if no other writer holds it on this host. Refused, it holds nothing any more (the caller writes nothing
        after): flock drops a converted lock before it tests, so of two parts asking at once, one is given it."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:                               # leave only the holders still there named (best effort)
            os.lseek(fd, 0, os.SEEK_SET)
            rest = os.read(fd, 1 << 16).decode(errors="replace").replace(self._line, "", 1)
            os.ftruncate(fd, 0)
            if self.shared and rest:
                os.write(fd, rest.encode())
        except OSError:
            pass
        finally:
            os.close(fd)                   # releases the flock


def _holders(fd: int) -> str:
    """The live holders the lock file names (this host's dead pids left out), for the refusal."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace")
    live = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        host, pid = parts[0], int(parts[1])
        if host != HOST or alive(pid):
            live.append(f"host {host} pid {pid}")
    return ", ".join(dict.fromkeys(live)) or "a process that did not say who it is"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# ---- records created exclusively ----

def claim_json(path: str | Path, obj: dict) -> dict:
    """Create ``path`` holding ``obj`` unless it exists; return what it holds (``obj``, or an earlier writer's).

    Exclusive: the finished temporary is hard-linked to ``path`` (atomic on local disks and NFS), which fails when
    another writer's record got there first; of two writers that start together, exactly one record wins. The
    temporary lives in an ``atomic_path``-style private folder (unpredictable name, flocked ``.lock``), so a link
    planted at a guessed name is never written through, and the sweep of dead writers' temporaries removes it
    when its writer is killed mid-claim."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_old_claims(path)
    if path.is_symlink() or path.exists():
        return _read_record(path)
    box, lock = _private_box(path)
    try:
        tmp = box / path.name
        with open(tmp, "x") as f:           # (the folder is private: "x" only says it is new)
            f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)              # fails if another writer's record (or a planted link) is there first
        except FileExistsError:
            pass
        except OSError:                     # a filesystem without hard links: a plain rename, last one wins
            if not path.exists() and not path.is_symlink():
                os.replace(tmp, path)
    finally:
        shutil.rmtree(box, ignore_errors=True)
        os.close(lock)
    return _read_record(path)


def _read_record(path: Path) -> dict:
    check_plain(path)                       # a record is the folder's own file, not a link to another one
    return json.loads(path.read_text())


def _remove_old_claims(path: Path) -> None:
    """Temporaries of writers killed mid-claim under the earlier naming (``.{name}.claim-{host}-{pid}``, before
    claims moved into private folders): this host's dead pids' go. Unlinking removes a link, never its target."""
    for stale in path.parent.glob(f".{path.name}.claim-{HOST}-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not alive(int(pid)):
            stale.unlink(missing_ok=True)
