"""The report builder on fixture run folders: grouping by run name over seeds, eval columns, plots."""

from __future__ import annotations

import json

import pytest

from distill.report import build
from refine.errors import InputError


def _run(root, name, seed, val_losses, kd="none", acc=None):
    folder = root / f"{name}_s{seed}"
    ckpt = folder / "checkpoints" / "step_0000200"
    ckpt.mkdir(parents=True)
    config = {"run_name": name, "seed": seed, "kd": {"signal": kd}, "data": {"train": "/x/instances_scored"}}
    (folder / "run.json").write_text(json.dumps({"config": config, "parameters": 1000}))
    recs = [{"step": 50 * (i + 1), "split": "val", "loss": v, "tokens": 51200 * (i + 1)}
            for i, v in enumerate(val_losses)]
    if kd != "none":
        recs[-1]["kl_teacher"] = 1.5
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (folder / "summary.json").write_text(json.dumps({"val_loss": val_losses[-1], "tokens": 204800,
                                                     "checkpoint": str(ckpt)}))
    if acc is not None:
        (ckpt / "eval.json").write_text(json.dumps({"tasks": {"rd_piqa": {"acc": acc - 0.01, "acc_norm": acc}}}))


def test_report_groups_seeds_and_reads_eval(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "lm_baseline", 0, [7.5, 7.0], acc=0.55)
    _run(runs, "lm_baseline", 1, [7.6, 7.2], acc=0.57)
    _run(runs, "kd_wsd", 0, [7.2, 6.5], kd="offline", acc=0.60)
    (runs / "unfinished").mkdir()                                  # no summary.json: not a row
    path = build([runs], "fixture", tmp_path / "reports")
    text = path.read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "7.1000 (7.0000..7.2000)" in rows["lm_baseline"] and "0,1" in rows["lm_baseline"]
    assert "0.560 (0.550..0.570)" in rows["lm_baseline"]             # acc_norm preferred, mean over seeds
    assert "6.5000" in rows["kd_wsd"] and "1.500" in rows["kd_wsd"] and "offline" in rows["kd_wsd"]
    assert (tmp_path / "reports" / "fixture_val_loss.png").stat().st_size > 1000
    assert (tmp_path / "reports" / "fixture_benchmarks.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "reports" / "fixture.json").read_text())["runs"]) == 3


def test_report_without_runs_is_one_line(tmp_path):
    with pytest.raises(InputError, match="no finished runs"):
        build([tmp_path], "x", tmp_path / "reports")
    with pytest.raises(InputError, match="no such runs folder"):
        build([tmp_path / "nope"], "x", tmp_path / "reports")
