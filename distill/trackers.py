"""Experiment trackers: where a run's scalars go besides ``metrics.jsonl`` (``trainer.loggers``).

One small interface, ``log(step, scalars)`` and ``close()``, and one class per backend, any subset:

- ``tensorboard``: ``tb/`` in the run folder;
- ``wandb``: ``wandb/`` in the run folder; ``trainer.wandb_mode`` or ``WANDB_MODE`` (offline keeps
  the run local, for ``wandb sync``);
- ``trackio``: trackio's local store (``TRACKIO_DIR``, else under the Hugging Face cache), one
  dashboard for every run: ``trackio show --project <trainer.log_project>``.

Each gets the resolved config once, when it opens; only rank 0 opens any
(``distill.metrics.Metrics``). wandb and trackio are optional packages
(``pip install -e '.[trackers]'``): one that is not installed is one error line before
anything runs.

Resuming: tensorboard drops its events after the checkpoint's step and takes the replayed steps
again, as ``metrics.jsonl`` does. wandb (its run id kept in the run folder) and trackio (the run
name) continue the same run and are sent only the steps after the last one they were sent before: a
hosted W&B run refuses to rewrite a step, and the replay repeats the same numbers.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from refine.core.errors import InputError
from refine.core.write import write_text_atomic

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}   # name -> import


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_installed(loggers: Sequence[str]) -> None:
    """Before anything runs: each named tracker's package is importable."""
    for name in loggers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise InputError(f"trainer.loggers names {name}, which is not installed: "
                             f"pip install {PACKAGES[name]}")


def open_trackers(loggers: Sequence[str], run_dir: Path, config: dict, resume_step: int,
                  sent_through: int) -> list[Tracker]:
    """The trackers ``loggers`` names, opened for a run at ``resume_step`` (0: a fresh one).
    ``config`` is the resolved run config; ``sent_through`` the last step the run logged before this
    start (0: none)."""
    if not loggers:
        return []
    check_installed(loggers)
    tc = config.get("trainer", {})
    project = tc.get("log_project", "refine-distill")
    name = tc.get("log_name") or run_dir.name       # the run folder's: unique within a sweep
    plain = json.loads(json.dumps(config))          # plain types: not every backend takes enums
    opened: list[Tracker] = []
    try:
        for logger in dict.fromkeys(loggers):
            if logger == "tensorboard":
                opened.append(TensorBoard(run_dir, resume_step))
            elif logger == "wandb":
                opened.append(WandB(run_dir, plain, project, name, tc.get("wandb_mode"),
                                    resume_step, sent_through))
            else:
                opened.append(Trackio(plain, project, name, resume_step, sent_through))
    except BaseException:
        for t in opened:
            t.close()
        raise
    return opened


class TensorBoard:
    def __init__(self, run_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step else None   # events of the steps a resume replays go
        self._w = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, v, step)

    def close(self) -> None:
        self._w.close()


class WandB:
    """A W&B run in ``<run folder>/wandb/``; its id is kept in ``wandb/run_id``, so a resume
    continues it."""

    def __init__(self, run_dir: Path, config: dict, project: str, name: str, mode: str | None,
                 resume_step: int, sent_through: int):
        import wandb

        id_file = run_dir / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else None
        self.sent_through = sent_through if run_id else 0   # a run new to W&B: every step from here
        if run_id is None:
            run_id = secrets.token_hex(6)       # in W&B's id alphabet; a new one per fresh start
            id_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(id_file, run_id + "\n")
        try:
            self._run = wandb.init(project=project, name=name, id=run_id, resume="allow",
                                   dir=str(run_dir), config=config, mode=mode)
        except wandb.errors.Error as e:         # not logged in, no network: say how to stay local
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"trainer.loggers: wandb could not start a run ({first}); to log "
                             f"offline set trainer.wandb_mode=offline or WANDB_MODE=offline"
                             ) from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.sent_through:
            self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class Trackio:
    """A trackio run named ``name`` in ``project``, in trackio's local store (``TRACKIO_DIR``)."""

    def __init__(self, config: dict, project: str, name: str, resume_step: int, sent_through: int):
        import trackio

        self.sent_through = sent_through if resume_step else 0
        self._run = trackio.init(project=project, name=name, config=config,
                                 resume="allow" if resume_step else "never")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.sent_through:
            self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()
