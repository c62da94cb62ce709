"""Schedules as pure functions of the step: the learning-rate multiplier and the KD weight alpha.

``lr_multiplier(step)`` returns the factor applied to the peak learning rate *for* optimizer step ``step``
(0-based). All shapes warm up linearly from 1/warmup to 1 over ``warmup_steps``.

* cosine: after warmup, cosine from 1 down to ``min_lr_ratio`` at the last step.
* wsd (warmup-stable-decay, MiniCPM): after warmup, hold 1 until the last ``decay_fraction`` of the steps,
  then decay to ``min_lr_ratio`` (linear, cosine or 1-sqrt shape). The stable phase is why WSD suits
  continued pretraining: any stable-phase checkpoint can be decayed later.
* constant: 1 after warmup.

The floor ``min_lr_ratio`` (0.1 in ``conf/schedule/cosine.yaml`` and ``wsd.yaml``) is the multiplier of the last
step: with 0 the last step's learning rate is exactly 0 and that step updates nothing.
"""

from __future__ import annotations

import math

from distill.config import AlphaConfig, ScheduleConfig
from refine.core.errors import InputError
from refine.core.write import atomic_path


def _decay(progress: float, shape: str) -> float:
    """Fraction of the way from 1 to the floor, for progress in [0, 1]."""
    if shape == "linear":
        return progress
    if shape == "cosine":
        return 0.5 * (1 - math.cos(math.pi * progress))
    if shape == "sqrt":
        return math.sqrt(progress)
    raise InputError(f"unknown decay shape {shape!r} (linear | cosine | sqrt)")


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    last = max(total_steps - 1, 1)
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "cosine":
        span = max(last - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return floor + (1 - floor) * (1 - _decay(progress, "cosine"))
    if cfg.name == "wsd":
        decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return 1 - (1 - floor) * _decay(progress, cfg.decay_shape)
    raise InputError(f"unknown lr schedule {cfg.name!r} (cosine | wsd | constant)")


def check(cfg: ScheduleConfig, total_steps: int) -> None:
    """Fail early, with one line, on a schedule that cannot work."""
    lr_multiplier(total_steps - 1, total_steps, cfg)
    _decay(0.5, cfg.decay_shape)
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise InputError(f"schedule.min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.name == "wsd" and not 0 < cfg.decay_fraction <= 1:
        raise InputError(f"schedule.decay_fraction must be in (0, 1], got {cfg.decay_fraction}")
    if cfg.warmup_steps >= total_steps:
        raise InputError(f"schedule.warmup_steps ({cfg.warmup_steps}) must be < trainer.max_steps ({total_steps})")
    if cfg.name == "wsd":
        check_wsd_phases("schedule", cfg.warmup_steps, cfg.decay_fraction, total_steps)


def check_wsd_phases(name: str, warmup_steps: int, decay_fraction: float, total_steps: int) -> None:
    """Warmup must end before the decay starts: a warmup running into the decay climbs to the peak and then
    drops at once to where the decay already is (1.0 to 0.505 for 90 warmup steps of 100 at decay 0.2)."""
    decay_start = total_steps - max(int(round(decay_fraction * total_steps)), 1)
    if warmup_steps > decay_start:
        raise InputError(f"{name}.warmup_steps ({warmup_steps}) runs into the decay, which starts at step "
                         f"{decay_start} of {total_steps} ({name}.decay_fraction={decay_fraction}): use at most "
                         f"{decay_start} warmup steps or a smaller decay_fraction")


def alpha_at(step: int, total_steps: int, cfg: AlphaConfig) -> float:
    """The KD weight for optimizer step ``step`` (0-based); see ``distill.config.AlphaConfig``."""
    lo, hi = cfg.floor, cfg.peak
    progress = step / max(total_steps - 1, 1)
    if cfg.schedule == "constant":
        return hi
    if cfg.schedule == "linear_increase":
        return lo + (hi - lo) * progress
    if cfg.schedule == "linear_decrease":
        return hi - (hi - lo) * progress
    if cfg.schedule == "periodic":
        return lo + (hi - lo) * 0.5 * (1 + math.cos(2 * math.pi * cfg.periods * progress))
    if cfg.schedule == "wsd":
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return lo + (hi - lo) * (step + 1) / cfg.warmup_steps
        decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return hi
        return hi - (hi - lo) * min((step - decay_start + 1) / decay_steps, 1.0)
    raise InputError(f"unknown alpha schedule {cfg.schedule!r} "
                     f"(constant | linear_increase | linear_decrease | periodic | wsd)")


def plot_schedules(path, cfg, with_alpha: bool) -> None:
    """The run's learning rate (and KD alpha) over its steps, as a PNG in the run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(cfg.trainer.max_steps)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, [cfg.optim.lr * lr_multiplier(s, cfg.trainer.max_steps, cfg.schedule) for s in steps],
            label=f"lr ({cfg.schedule.name})")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    if with_alpha:
        ax2 = ax.twinx()
        ax2.plot(steps, [alpha_at(s, cfg.trainer.max_steps, cfg.kd.alpha) for s in steps], color="C1",
                 label=f"alpha ({cfg.kd.alpha.schedule})")
        ax2.set_ylabel("KD weight alpha")
        ax2.set_ylim(0, 1)
        fig.legend(loc="lower left")
    else:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:           # (same name: savefig takes the format from its suffix)
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
