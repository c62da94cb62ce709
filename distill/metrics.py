"""What a training run records: ``run.json`` (how it was made), ``metrics.jsonl``, ``summary.json``.

``metrics.jsonl`` is append-only, one record per optimizer step (``split: train``) and per validation
(``split: val``). A resumed run first drops the records after its checkpoint's step, so the file always reads
as one uninterrupted run. Each record's numbers also go to the trackers ``trainer.loggers`` names
(``distill.trackers``), as ``<split>/<key>``. ``StepMeans`` averages a step's micro-batch losses the way the
trainer logs them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from distill.trackers import open_trackers
from refine.core.errors import write_error_line
from refine.core.manifest import code_version
from refine.core.tokenizer import tokenizer_hash
from refine.core.write import check_plain, open_append, write_json_atomic, write_text_atomic


class Metrics:
    """Append-only JSONL (+ trackers). On resume, records after the checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int, loggers: Sequence[str] = (), *,
                 config: dict | None = None, enabled: bool = True, defer_errors: bool = False):
        # defer_errors (under torchrun): a failed write is kept for the next checkpoint, where every rank ends
        # with it (distributed.on_main); raised here, it would end rank 0 alone and leave the others in a collective
        self.path, self.enabled, self.defer_errors, self.failed = run_dir / "metrics.jsonl", enabled, defer_errors, None
        if not enabled:                   # ranks other than 0 under torchrun
            return
        check_plain(self.path, "use another run_name")   # a link planted here is neither read nor written through
        sent_through = 0                  # the last step logged before this start
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            if lines and not _parses(lines[-1]):
                lines.pop()               # a record cut short by a full disk: written again after the resume
            sent_through = max((json.loads(line)["step"] for line in lines), default=0)
            keep = [line for line in lines if json.loads(line)["step"] <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in keep))
        self._file = open_append(self.path)
        try:
            self._trackers = open_trackers(loggers, run_dir, config or {}, resume_step,
                                           sent_through)
        except BaseException:
            self._file.close()
            raise

    def log(self, record: dict) -> None:
        if not self.enabled or self.failed:   # after a failed write nothing more: a resume rewrites from there
            return
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:              # a failed write() names no file: the one-line error names this one
            e.filename = e.filename or str(self.path)
            if not self.defer_errors:
                raise
            self.failed = self.failed or write_error_line(e) or f"cannot write {self.path}: {e}"
            return
        if self._trackers:
            scalars = {f"{record['split']}/{k}": v for k, v in record.items()
                       if k not in ("step", "split") and isinstance(v, (int, float))}
            for tracker in self._trackers:
                tracker.log(record["step"], scalars)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        for tracker in self._trackers:
            tracker.close()


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


class StepMeans:
    """One optimizer step's logged losses over its ``n`` micro-batches: the total loss summed and divided once at
    the end, each loss part divided as it is added (the order of operations fixes the logged floats)."""

    def __init__(self, n: int):
        self.n, self.loss_sum, self.parts = n, 0.0, {}

    def add(self, loss: float, parts: dict[str, float]) -> None:
        self.loss_sum += loss
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v / self.n

    def means(self) -> dict[str, float]:
        return {"loss": self.loss_sum / self.n, **self.parts}


def write_run_record(run_dir: Path, resolved: dict, tokenizer, train_set, val_set, *, parameters: int,
                     device: torch.device, world: int, parallel: str, amp: torch.dtype | None) -> None:
    """``run.json``: the resolved config, code version and data fingerprints, enough to tell what made the run."""
    write_json_atomic(run_dir / "run.json", {
        "config": resolved, "code_version": code_version(), "tokenizer_hash": tokenizer_hash(tokenizer),
        "train_instances": {"path": str(train_set.folder), "count": len(train_set),
                            "sha256": train_set.index["tokens_sha256"]},
        "val_instances": {"path": str(val_set.folder), "count": len(val_set),
                          "sha256": val_set.index["tokens_sha256"]},
        "parameters": parameters, "device": str(device), "processes": world,
        "parallel": parallel if world > 1 else "none", "precision": str(amp or torch.float32),
        "torch": torch.__version__,
    })


def write_summary(run_dir: Path, summary: dict) -> None:
    write_json_atomic(run_dir / "summary.json", summary)
