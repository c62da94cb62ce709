"""The report builder on fixture run folders: grouping by run name over seeds, eval columns, plots."""

from __future__ import annotations

import json

import pytest

from distill.report import build
from refine.core.errors import InputError


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


def test_baseline_comparison_says_who_beat_it(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "lm_baseline", 0, [7.5, 7.0])
    _run(runs, "lm_baseline", 1, [7.6, 7.2])
    _run(runs, "kd_wsd", 0, [7.2, 6.5], kd="offline")
    _run(runs, "kd_offline", 0, [7.4, 7.3], kd="offline")
    text = build([runs], "cmp", tmp_path / "reports", baseline="lm_baseline").read_text()
    assert "Did `kd_wsd` beat `lm_baseline` here? **yes**: val loss 6.5000 vs 7.1000 (-0.6000)" in text
    assert "Did `kd_offline` beat `lm_baseline` here? **no**: val loss 7.3000 vs 7.1000 (+0.2000)" in text
    saved = json.loads((tmp_path / "reports" / "cmp.json").read_text())["comparison"]
    assert {c["run"]: c["beat_baseline"] for c in saved} == {"kd_wsd": True, "kd_offline": False}
    with pytest.raises(InputError, match="no baseline run 'lm' among"):
        build([runs], "cmp", tmp_path / "reports", baseline="lm")


def test_report_without_runs_is_one_line(tmp_path):
    with pytest.raises(InputError, match="no finished runs"):
        build([tmp_path], "x", tmp_path / "reports")
    with pytest.raises(InputError, match="no such runs folder"):
        build([tmp_path / "nope"], "x", tmp_path / "reports")


def test_sweep_runs_group_by_their_overrides_except_seed(tmp_path):
    runs = tmp_path / "sweep"

    def launched(name: str, seed: int, overrides: list[str]) -> None:
        hydra_dir = runs / f"{name}_s{seed}" / ".hydra"
        hydra_dir.mkdir()
        (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (hydra_dir / "hydra.yaml").write_text("hydra:\n  job:\n    config:\n      override_dirname:\n"
                                              "        exclude_keys: [trainer.max_steps]\n")

    for seed, v in ((0, 7.0), (1, 7.2)):
        _run(runs, f"a{seed}", seed, [v], kd="offline")
        launched(f"a{seed}", seed, ["+experiment=kd_offline", f"seed={seed}", "kd.alpha.peak=0.5",
                                    "kd.logits=/x/teacher/logits_k10", "trainer.max_steps=5"])
    _run(runs, "b", 0, [6.9], kd="offline")
    launched("b", 0, ["+experiment=kd_offline", "seed=0", "trainer.max_steps=5"])
    for folder in runs.iterdir():   # every run's run_name is the experiment's
        cfg = json.loads((folder / "run.json").read_text())
        cfg["config"]["run_name"] = "kd_offline"
        (folder / "run.json").write_text(json.dumps(cfg))
    text = build([runs], "sweep", tmp_path / "reports", refined=None).read_text()
    rows = [line.split(" | ")[0].strip("| ") for line in text.splitlines() if line.startswith("| kd")]
    assert rows == ["kd_offline kd.alpha.peak=0.5 kd.logits=logits_k10", "kd_offline"]
    # an override every run shares says nothing about how the rows differ: left out of the labels
    for folder in runs.iterdir():
        overrides = folder / ".hydra" / "overrides.yaml"
        overrides.write_text(overrides.read_text() + "- data.train=/x/instances_scored\n")
    text = build([runs], "sweep", tmp_path / "reports", refined=None).read_text()
    assert [line.split(" | ")[0].strip("| ") for line in text.splitlines() if line.startswith("| kd")] == rows
    assert "7.1000 (7.0000..7.2000)" in text


@pytest.mark.integration
def test_real_multirun_with_joblib_then_report(tiny_overrides, tmp_path):
    """`--multirun` over seeds with the joblib launcher (two jobs side by side), as `make sweep` runs it."""
    import subprocess
    import sys

    from tests.conftest import REPO

    sweep = tmp_path / "sweep"
    # The tokenizer through paths.teacher (model.tokenizer's default): paths are not part of sweep folder names.
    tok = next(o for o in tiny_overrides if o.startswith("model.tokenizer=")).split("=", 1)[1]
    # data.seq_len left at the experiment's: a sweep folder is named by every override it has
    args = [o for o in tiny_overrides if not o.startswith(("run_dir=", "+experiment=", "model.tokenizer=",
                                                          "data.seq_len="))]
    args.append(f"paths.teacher={tok}")
    res = subprocess.run([sys.executable, "-m", "distill.train", "--multirun", "hydra/launcher=joblib",
                          "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", "+experiment=lm_baseline",
                          *args, "seed=0,1", "trainer.max_steps=6", "trainer.threads=1"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["+debug=tiny,+experiment=lm_baseline,seed=0",
                                                                    "+debug=tiny,+experiment=lm_baseline,seed=1"]
    data = json.loads(build([sweep], "s", tmp_path / "reports").with_suffix(".json").read_text())
    assert sorted(r["seed"] for r in data["runs"]) == [0, 1]
    assert {r["label"] for r in data["runs"]} == {"lm_baseline"}   # +debug=tiny is every run's: not a difference
    losses = [r["val_loss"] for r in data["runs"]]
    assert losses[0] != losses[1]                                # the seed reached the model init and data order
