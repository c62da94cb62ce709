"""What a refine run shows on the terminal: its own lines, progress and one-line errors. Library noise (Python
warnings, vLLM/torch/transformers logging and loading bars, the scoring child's whole stderr, a crash's
traceback) goes to ``<out>/logs/<name>.log``, appended, one header line per run; ``verbose=true`` also shows it
on the terminal, as the libraries print it. This process's own library noise: ``refine.core.library_noise``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections import deque
from pathlib import Path

from refine.core.write import open_append
from refine.progress import Progress, parse_event

# the line of a traceback that names the exception (``RuntimeError: ...``, ``torch.OutOfMemoryError: ...``)
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:.*)?$")


def log_path(out: str | Path, name: str) -> Path:
    return Path(out) / "logs" / f"{name}.log"


class LogFile:
    """An appended log; a write that fails (full disk, file-size limit) ends logging, never the run. A link or a
    FIFO planted at ``path`` is refused (``refine.core.write.open_append``: one ``InputError`` line)."""

    def __init__(self, path: Path, header: str):
        self.path, self.f = path, None
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open_append(path, errors="replace")
        self.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {header} (pid {os.getpid()}) ====\n")

    def write(self, text: str) -> None:
        if self.f is None:
            return
        try:
            self.f.write(text if text.endswith("\n") else text + "\n")
            self.f.flush()
        except OSError:
            self.close()

    def close(self) -> None:
        if self.f is not None:
            with contextlib.suppress(OSError):
                self.f.close()
            self.f = None


class ChildOutput:
    """Where a scoring child's stderr lines go: its progress events to a ``Progress`` display, its ``error: ...``
    line kept (the run's one line), every other line to the log, and to the terminal only with ``verbose``."""

    def __init__(self, log: LogFile, desc: str, verbose: bool, stream=None):
        self.log, self.desc, self.verbose = log, desc, verbose
        self.stream = sys.stderr if stream is None else stream
        self.errors: list[str] = []
        self.tail: deque[str] = deque(maxlen=200)
        self.progress: Progress | None = None

    def __call__(self, line: str) -> None:
        ev = parse_event(line)
        if ev is not None:
            if ev.get("start"):
                self.close_progress()
                self.progress = Progress(ev["instances"], self.desc, self.stream, initial=ev.get("done", 0))
            elif self.progress is not None:
                self.progress.update(ev["instances"], ev["tokens"])
            return
        self.log.write(line)
        if line.startswith("error: "):
            self.errors.append(line[len("error: "):].strip())
            return
        if line.strip():
            self.tail.append(line.rstrip("\n").split("\r")[-1])
        if self.verbose:
            (self.progress.write if self.progress is not None else self._show)(line)

    def _show(self, line: str) -> None:
        self.stream.write(line if line.endswith("\n") else line + "\n")
        self.stream.flush()

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def failure(self, returncode: int) -> str:
        """What ended the child, its last relevant line and where the rest is (for the run's one error line)."""
        if returncode < 0:
            try:
                how = f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
            except ValueError:
                how = f"killed by signal {-returncode}"
        else:
            how = f"exit {returncode}"
        return f"{how}: {last_relevant(self.tail) or 'no output'}; its output is in {self.log.path}"


def last_relevant(lines) -> str | None:
    """The line naming the exception of the last traceback among ``lines``, else the last non-blank line."""
    lines = [ln.strip() for ln in lines if ln.strip()]
    for ln in reversed(lines):
        if _EXCEPTION.match(ln):
            return ln
    return lines[-1] if lines else None
