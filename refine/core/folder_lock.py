"""Writers of one folder on one host know of each other: an ``flock`` on ``<folder>/.writer.lock``.

flock, because the kernel drops it when its holder dies (kill -9, OOM): a dead run's lock is taken over by
the next one with no clean-up step and no pid guessing. The file's text (one ``host pid mode`` line per
holder) only serves to name the holder in the refusal.

Two modes. Exclusive: a writer that owns the whole folder (an unsharded refine run, the finishing step,
re-selection, ``overwrite=true``, a trainer). Shared: refine's shard parts (``--shard i/N``), which by design
write disjoint shard files into one folder at the same time; that they score the same configuration is what
the folder's key files check (``refine.__main__``), not the lock. So parts run together, and a finisher or an
overwrite waits until no part on this host is running.

Across machines on shared storage this lock is not relied on: Linux emulates flock on NFS with byte-range
locks, which reach other clients only where the lock daemon works. There the key checks do the work (README).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from refine.core.errors import InputError

LOCK_NAME = ".writer.lock"
HOST = socket.gethostname()


class FolderLock:
    """``with FolderLock(folder, "refine run", hint="use another out="):`` refuses with one line when held."""

    def __init__(self, folder: str | Path, what: str, hint: str, shared: bool = False):
        self.folder, self.what, self.hint, self.shared = Path(folder), what, hint, shared
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
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
