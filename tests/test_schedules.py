"""Learning-rate schedules hit their specified values at the boundary steps."""

import math
from pathlib import Path

import pytest

from distill.config import ScheduleConfig
from distill.schedules import check, lr_multiplier
from refine.core.errors import InputError


def test_cosine_boundaries():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cfg) == pytest.approx(0.1)      # first warmup step: 1/10
    assert lr_multiplier(9, 100, cfg) == pytest.approx(1.0)      # warmup ends at the peak
    assert lr_multiplier(10, 100, cfg) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, cfg) == pytest.approx(0.1)     # last step at the floor
    progress = (54 - 10) / 89
    assert lr_multiplier(54, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    values = [lr_multiplier(s, 100, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))       # monotone decay


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_boundaries(shape):
    cfg = ScheduleConfig(name="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2, decay_shape=shape)
    total = 100
    assert lr_multiplier(4, total, cfg) == pytest.approx(1.0)
    assert all(lr_multiplier(s, total, cfg) == 1.0 for s in range(5, 80))   # stable until the last 20%
    assert lr_multiplier(80, total, cfg) < 1.0                              # decay starts at 80
    assert lr_multiplier(99, total, cfg) == pytest.approx(0.0)              # and ends at the floor


def test_wsd_linear_midpoint():
    cfg = ScheduleConfig(name="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.5, decay_shape="linear")
    assert lr_multiplier(74, 100, cfg) == pytest.approx(0.5)


def test_bad_schedules_fail_early():
    with pytest.raises(InputError):
        check(ScheduleConfig(name="triangle"), 100)
    with pytest.raises(InputError):
        check(ScheduleConfig(name="cosine", warmup_steps=100), 100)


def test_a_wsd_warmup_that_runs_into_the_decay_is_refused():
    """Before: 90 warmup steps of 100 with the last 20% decaying climbed to 1.0, then fell at once to 0.505."""
    cfg = ScheduleConfig(name="wsd", warmup_steps=90, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_multiplier(89, 100, cfg) == pytest.approx(1.0) and lr_multiplier(90, 100, cfg) < 0.51
    with pytest.raises(InputError, match=r"schedule.warmup_steps \(90\) runs into the decay, which starts at "
                                         r"step 80 of 100"):
        check(cfg, 100)
    check(ScheduleConfig(name="wsd", warmup_steps=80, min_lr_ratio=0.1, decay_fraction=0.2), 100)


def _alpha(schedule, **kw):
    from distill.config import AlphaConfig

    return AlphaConfig(schedule=schedule, peak=0.9, floor=0.1, **kw)


@pytest.mark.parametrize("schedule, first, last", [
    ("constant", 0.9, 0.9), ("linear_increase", 0.1, 0.9), ("linear_decrease", 0.9, 0.1),
    ("periodic", 0.9, 0.9),
])
def test_alpha_schedules_boundaries(schedule, first, last):
    from distill.schedules import alpha_at

    cfg = _alpha(schedule, periods=2)
    assert alpha_at(0, 101, cfg) == pytest.approx(first)
    assert alpha_at(100, 101, cfg) == pytest.approx(last)
    if schedule == "periodic":                                  # two cycles: troughs at 1/4 and 3/4
        assert alpha_at(25, 101, cfg) == pytest.approx(0.1) and alpha_at(50, 101, cfg) == pytest.approx(0.9)
    if schedule.startswith("linear"):
        assert alpha_at(50, 101, cfg) == pytest.approx(0.5)


def test_alpha_wsd_follows_the_lr_shape():
    from distill.schedules import alpha_at

    cfg = _alpha("wsd", warmup_steps=10, decay_fraction=0.2)
    assert alpha_at(0, 100, cfg) == pytest.approx(0.1 + 0.8 / 10)
    assert alpha_at(9, 100, cfg) == pytest.approx(0.9)
    assert all(alpha_at(s, 100, cfg) == 0.9 for s in range(10, 80))
    assert alpha_at(80, 100, cfg) < 0.9 and alpha_at(99, 100, cfg) == pytest.approx(0.1)
    with pytest.raises(InputError):
        alpha_at(0, 10, _alpha("zigzag"))


def test_the_shipped_wsd_and_cosine_floors_leave_the_last_step_a_learning_rate():
    """Issue 16: conf/schedule/wsd.yaml decayed to exactly 0, so its last step updated nothing."""
    from omegaconf import OmegaConf

    from distill.config import ScheduleConfig

    conf = Path(__file__).resolve().parent.parent / "conf" / "schedule"
    for name in ("wsd", "cosine"):
        shipped = OmegaConf.load(conf / f"{name}.yaml")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ScheduleConfig), shipped))
        assert lr_multiplier(99, 100, cfg) == pytest.approx(cfg.min_lr_ratio) and cfg.min_lr_ratio >= 0.01


def test_val_batches_spread_over_the_whole_split():
    """Issue 16: the first rows of a split that lists its sources one after another are one source."""
    import numpy as np

    from distill.data import val_batches

    class _Rows:
        tokens = np.arange(100)[:, None].repeat(4, 1)

        def __len__(self):
            return 100

        def check_ids(self, rows, which):            # Instances': ids in the vocabulary (all are here)
            pass

    rows = [int(r) for b in val_batches(_Rows(), 4, 2) for r in b[:, 0]]
    assert rows == [0, 14, 28, 42, 57, 71, 85, 99]


@pytest.mark.parametrize("total", [5, 10, 37, 100])
def test_a_wsd_warmup_is_allowed_exactly_when_it_ends_before_the_decay(total):
    """Issue 29: a warmup running past the stable phase took the lr from 1.0 to 0.28 in one step (95 warmup
    steps of 100, linear decay over 0.2). ``check`` allows a warmup exactly when it leaves the rest of the
    schedule alone: from the warmup's last step (1.0) on, the lr is the warmup-free schedule's, so no step falls
    further than the decay's own steps do (warmup == the decay's first step: no stable phase, still no jump)."""
    from distill.config import AlphaConfig
    from distill.schedules import alpha_at, check_wsd_phases

    for frac in (0.05, 0.2, 0.5, 1.0):
        for shape in ("linear", "cosine", "sqrt"):
            flat = ScheduleConfig(name="wsd", warmup_steps=0, min_lr_ratio=0.1, decay_fraction=frac,
                                  decay_shape=shape)
            for warmup in range(1, total):
                cfg = ScheduleConfig(name="wsd", warmup_steps=warmup, min_lr_ratio=0.1, decay_fraction=frac,
                                     decay_shape=shape)
                keeps_the_rest = all(lr_multiplier(s, total, cfg) == lr_multiplier(s, total, flat)
                                     for s in range(warmup - 1, total))
                try:
                    check(cfg, total)
                    allowed = True
                except InputError as e:
                    allowed = False
                    assert "\n" not in str(e) and f"schedule.warmup_steps ({warmup}) runs into the decay" in str(e)
                assert allowed == keeps_the_rest, (total, frac, shape, warmup)
            # kd.alpha's wsd shares the check and the shape
            for warmup in range(1, total):
                a, a_flat = (AlphaConfig(schedule="wsd", peak=0.9, floor=0.1, warmup_steps=w, decay_fraction=frac)
                             for w in (warmup, 0))
                keeps_the_rest = all(math.isclose(alpha_at(s, total, a), alpha_at(s, total, a_flat))  # floor + 0.8
                                     for s in range(warmup - 1, total))
                try:
                    check_wsd_phases("kd.alpha", warmup, frac, total)
                    allowed = True
                except InputError:
                    allowed = False
                assert allowed == keeps_the_rest, ("alpha", total, frac, warmup)
