"""The paper-scale plan: ids per position re-truncated from a real store, storage and FLOPs arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from distill.plan import _kd_over_lm, main, pairs_per_position, plan
from refine.core.logits import LogitsWriter, StoreHeader


def _store(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 15, 100)) * 3
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-lp, -1)[..., :20]
    writer = LogitsWriter(tmp_path / "s", StoreHeader(100, "h", 0.95, 20, 15))
    writer.finish([writer.write_shard(0, order, np.take_along_axis(lp, order, -1).astype(np.float32))])
    return str(tmp_path / "s"), np.take_along_axis(lp, order, -1)


def test_plan_figures(tmp_path, capsys):
    store, sorted_lp = _store(tmp_path)
    probs = np.exp(sorted_lp)
    expected = np.clip(((np.cumsum(probs, -1) - probs) < 0.8).sum(-1), 1, 5).mean()
    pairs, source = pairs_per_position(store, 0.8, 5)
    assert pairs == pytest.approx(expected, abs=0.02) and "measured" in source
    assert pairs_per_position(store, 0.99, 5)[0] == 5.0                    # beyond the store: the bound k
    p = plan(1e9, 200_000, 0.8, 5, teacher_params=1e9, student_params=1e8, gpu_tflops=100, mfu=0.5,
             store_dir=store)
    assert p["raw_bytes_per_token"] == pytest.approx(1 + pairs * 6)       # 4-byte ids above 65,536
    assert p["teacher_gpu_hours_flops"] == pytest.approx(2e18 / 5e13 / 3600)
    assert p["student_lm_gpu_hours"] == pytest.approx(6e17 / 5e13 / 3600)
    # the reference: 1/17 of the teacher, one pass over 5% of the tokens, then scoring the other 95%
    assert p["reference_params"] == pytest.approx(1e9 * 0.0588)
    assert p["reference_train_gpu_hours"] == pytest.approx(6 * 5.88e7 * 5e7 / 5e13 / 3600)
    assert p["reference_scoring_gpu_hours"] == pytest.approx(2 * 5.88e7 * 9.5e8 / 5e13 / 3600)
    main(["--tokens", "1e6", "--student-params", "1e7", "--store", store, "--top-p", "0.8", "--top-k", "5"])
    printed = capsys.readouterr().out
    assert "logits, raw codec" in printed and "reference LM training" in printed


def test_kd_ratio_is_the_paired_one_at_the_nearest_vocab():
    bench = {"kd_offline_over_lm": 0.8, "paired": {"49152": {"kd_over_lm": 0.99}, "151552": {"kd_over_lm": 1.03}}}
    assert _kd_over_lm(bench, 32_000) == 0.99 and _kd_over_lm(bench, 262_144) == 1.03
    assert _kd_over_lm({"kd_offline_over_lm": 1.2}, 32_000) == 1.2 and _kd_over_lm({}, 32_000) == 1.0


def test_teacher_hours_are_the_larger_of_flops_and_host_bound(monkeypatch, capsys):
    import distill.plan as plan_mod

    ceiling = {"machine": {"cpu": "test cpu"}, "host_ceiling": {
        "1024": {"cpu_s_per_mpos": 50.0, "seq_len": 2048}, "151552": {"cpu_s_per_mpos": 200.0, "seq_len": 2048}}}
    monkeypatch.setattr(plan_mod, "_load", lambda name: ceiling if name == "refine_ceiling.json" else None)
    cpu_s, source = plan_mod._host_ceiling(ceiling, 200_000)
    assert cpu_s == 200e-6 and "vocab 151,552" in source and "test cpu" in source
    small = plan(1e12, 200_000, 0.95, 50, teacher_params=1e8, student_params=1e8, gpu_tflops=100, mfu=0.5,
                 store_dir=None, host_cores=4)
    assert small["teacher_gpu_hours_host"] == pytest.approx(1e12 * 200e-6 / 4 / 3600)
    assert small["teacher_gpu_hours"] == small["teacher_gpu_hours_host"] > small["teacher_gpu_hours_flops"]
    big = plan(1e12, 2048, 0.95, 50, teacher_params=1e11, student_params=1e8, gpu_tflops=100, mfu=0.5,
               store_dir=None, host_cores=4)
    assert big["teacher_gpu_hours_host"] == pytest.approx(1e12 * 50e-6 / 4 / 3600)     # the 1,024 entry: nearest
    assert big["teacher_gpu_hours"] == big["teacher_gpu_hours_flops"] > big["teacher_gpu_hours_host"]
    main(["--tokens", "1e9", "--student-params", "1e7", "--vocab", "151552", "--store", "none"])
    out = capsys.readouterr().out
    assert "host-bound (bench/results/refine_ceiling.json, test cpu" in out and "FLOPs-bound" in out
