"""Progress over a scoring pass: instances scored, rate, tokens/s and ETA.

On a terminal a tqdm bar (as training shows); elsewhere (CI logs, files) a plain line every ``every_s`` seconds and
at the end, so a log gets no carriage returns. The scoring child reports to its parent with ``event`` lines on
stderr (``refine-progress {json}``), which the parent turns back into this display (``refine.console``).
"""

from __future__ import annotations

import json
import sys
import threading
import time

EVENT = "refine-progress "


def event(stream, **fields) -> None:
    """One progress event for the parent: ``start`` (instances: this part's total, done: already finished) or a
    scored shard (instances, tokens). One write per line: events come from the writer threads."""
    stream.write(EVENT + json.dumps(fields) + "\n")
    stream.flush()


class Events:
    """A ``Progress``'s ``update``/``close`` that reports to the parent instead: a ``start`` event now, one event
    per scored shard."""

    def __init__(self, total: int, initial: int = 0, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.lock = threading.Lock()
        event(self.stream, start=True, instances=total, done=initial)

    def update(self, instances: int, tokens: int) -> None:
        with self.lock:
            event(self.stream, instances=instances, tokens=tokens)

    def close(self) -> None:
        pass


def parse_event(line: str) -> dict | None:
    """The fields of an ``event`` line, else None."""
    if not line.startswith(EVENT):
        return None
    try:
        return json.loads(line[len(EVENT):])
    except ValueError:
        return None


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Instances of one pass scored so far. ``initial``: those finished before (a resumed pass): counted in the
    position, not in the rate. ``tty``: bar or plain lines (default: whether ``stream`` is a terminal)."""

    def __init__(self, total: int, desc: str, stream=None, initial: int = 0, every_s: float = 30.0,
                 tty: bool | None = None, clock=time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.done, self.every_s, self.clock = total, desc, initial, every_s, clock
        self.scored = self.tokens = 0
        self.printed = initial
        self.t0 = self.last = clock()
        self.lock = threading.Lock()
        self.bar = None
        if _isatty(self.stream) if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="inst", file=self.stream,
                            dynamic_ncols=True)

    def update(self, instances: int, tokens: int) -> None:
        with self.lock:
            self.done += instances
            self.scored += instances
            self.tokens += tokens
            now = self.clock()
            if self.bar is not None:
                self.bar.set_postfix_str(f"{self.tokens / max(now - self.t0, 1e-9):,.0f} tok/s", refresh=False)
                self.bar.update(instances)
            elif now - self.last >= self.every_s or self.done >= self.total:
                self._print(now)

    def _print(self, now: float) -> None:
        self.last, self.printed = now, self.done
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def line(self, now: float) -> str:
        """The plain form: ``teacher: 48/64 instances (75%), 12.0 inst/s, 768 tok/s, ETA 0:00:01``."""
        elapsed = max(now - self.t0, 1e-9)
        rate = self.scored / elapsed
        left = self.total - self.done
        tail = (f"ETA {_clock(left / rate)}" if left > 0 and rate > 0 else
                f"in {_clock(elapsed)}" if left <= 0 else "ETA ?")
        return (f"  {self.desc}: {self.done:,}/{self.total:,} instances ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:,.1f} inst/s, {self.tokens / elapsed:,.0f} tok/s, {tail}")

    def write(self, text: str) -> None:
        """A line of other output, above the bar."""
        with self.lock:
            if self.bar is not None:
                self.bar.write(text.rstrip("\n"), file=self.stream)
            else:
                self.stream.write(text if text.endswith("\n") else text + "\n")
                self.stream.flush()

    def close(self) -> None:
        """The bar closed, or the last position printed if it was not (a pass that stopped early)."""
        if self.bar is not None:
            self.bar.close()
        elif self.done != self.printed:
            with self.lock:
                self._print(self.clock())


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
