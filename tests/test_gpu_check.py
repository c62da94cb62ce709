"""bench/gpu_check.py stays ready for a GPU machine: its --dry run (tiny shapes, the same code paths, on CPU)
writes every case with finite positive figures, and neither it nor the project modules it imports import vLLM,
lm-eval or scipy (a GPU machine has none of them). No speed is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("vllm", "lm_eval", "scipy")

# Runs the script with every import statement of a project file (refine/, distill/, bench/) checked: one of
# BLOCKED fails there even when another package (transformers imports scipy where installed) loaded it already.
GUARD = """
import builtins, runpy, sys
repo, script, blocked = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
ours = tuple(f"{repo}/{pkg}/" for pkg in ("refine", "distill", "bench"))     # not .venv/ inside the repo
real_import = builtins.__import__

def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    where = (globals or {}).get("__file__") or ""
    if name.split(".")[0] in blocked and where.startswith(ours):
        raise ImportError(f"{where} imports {name}, which a GPU machine does not have")
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = guarded
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.integration
def test_dry_run_writes_every_case(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-c", GUARD, str(REPO), str(REPO / "bench" / "gpu_check.py"), ",".join(BLOCKED),
           "--dry", "--out", str(out), "--peak-tflops", "1", "--device", "cpu"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry"] and res["complete"] and res["imported"] == {"vllm": False, "lm_eval": False}
    assert res["device"]["type"] == "cpu" and res["device"]["torch"] and res["device"]["transformers"]
    cases = res["cases"]
    assert [r for r in cases if r["status"] != "ok"] == []
    variants = {(r["kind"], r["variant"], r["compile"]) for r in cases}
    assert variants == {(k, v, c) for c in ("off", "on") for k, vs in
                        (("train_step", ("plain", "lm", "kd_offline", "kd_online")), ("scorer", ("hf",)))
                        for v in vs}
    for r in cases:
        keys = ["n_params", "tokens_per_s", "case_s"]
        if r["kind"] == "train_step":
            keys += ["step_s", "first_step_s", "mem_mb", "x_plain_step", "x_plain_mem"]
            assert all(_positive(t) for t in r["steps_s"]) and len(r["steps_s"]) == res["plan"]["steps"]
        else:
            keys += ["call_s", "first_batch_s", "mfu"]
        if r["compile"] == "on":
            keys += ["x_eager", "graphs"]       # graphs >= 1: the compiled case did not silently run eagerly
        assert all(_positive(r[k]) for k in keys), {k: r.get(k) for k in keys}
    kd = next(r for r in cases if r["variant"] == "kd_offline")
    assert 1 <= kd["signal_kept_mean"] <= 50
    assert "kd_online compile=on" in run.stdout and str(out) in run.stdout       # the table was printed


def test_budget_skips_and_errors_are_recorded():
    sys.path.insert(0, str(REPO))
    from bench.gpu_check import MIN_LEFT, add_ratios, run_jobs

    now = [0.0]
    clock = lambda: now[0]
    closed = []

    def job(variant, compile_, seconds, fail=False):
        def run():
            now[0] += seconds
            if fail:
                raise RuntimeError("CUDA out of memory")
            return {"step_s": seconds, "mem_mb": 10.0 * seconds}

        return {"case": {"kind": "train_step", "model": "m", "vocab": 8, "variant": variant, "compile": compile_},
                "run": run, "done": lambda: closed.append(variant)}

    todo = [job("plain", "off", 2.0), job("lm", "off", 1.0), job("kd_online", "off", 1.0, fail=True),
            job("plain", "on", 4.0), job("lm", "on", 1.0)]
    budget = 4.0 + MIN_LEFT["on"]          # the first compiled case starts with exactly MIN_LEFT["on"] left
    seen = []
    records = run_jobs(todo, budget, clock=clock, start=0.0, after=lambda rs: seen.append(len(rs)))
    assert seen == [1, 2, 3, 4, 5]                                     # the JSON is rewritten after every case
    assert [r["status"] for r in records] == ["ok", "ok", "error", "ok", "skipped"]
    assert "out of memory" in records[2]["error"] and "budget" in records[4]["reason"]
    assert closed == ["plain", "lm", "kd_online", "plain", "lm"]      # cleanup runs for skipped cases too
    add_ratios(records)
    assert records[1]["x_plain_step"] == 0.5 and records[1]["x_plain_mem"] == 0.5
    assert records[3]["x_eager"] == 2.0 and "x_eager" not in records[4]


def test_no_real_run_without_a_gpu(monkeypatch):
    sys.path.insert(0, str(REPO))
    from bench import gpu_check

    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu"])
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main()
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry"])
    with pytest.raises(SystemExit):             # --dry needs --out: the real results file is never overwritten
        gpu_check.main()
