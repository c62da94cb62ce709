"""kill -9 at random moments, several times, then rerun the same command: refine and train finish with exactly the
outputs and loss curve of an uninterrupted run. Nothing half-written is taken for finished (the outputs would
differ) and no temporary is left behind (the file lists would differ)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, refine_output_differences

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}   # fixed threads: identical float sums


def _crash_then_finish(cmd: list[str], rng: random.Random, kills: int, window: tuple[float, float]) -> int:
    """Start ``cmd`` and SIGKILL its whole process group (refine's scoring children too) after a random delay,
    ``kills`` times or until it finishes first; then run it to the end. Returns how many kills landed."""
    landed = 0
    for _ in range(kills):
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            proc.wait(timeout=rng.uniform(*window))
            break                                                   # finished before the kill
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            landed += 1
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return landed


def test_refine_killed_repeatedly_finishes_identically(refine_overrides, tmp_path):
    overrides = [o for o in refine_overrides if not o.startswith("out=")] + ["pack.max_instances=160"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    cmd = [sys.executable, "-m", "refine", *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd + [f"out={straight}"], cwd=REPO, env=ENV, check=True, capture_output=True, timeout=900)
    took = time.perf_counter() - t0      # kill moments scale with it: a loaded machine must not let runs finish first
    landed = _crash_then_finish(cmd + [f"out={crashed}"], random.Random(0), kills=4, window=(0.15 * took, 0.6 * took))
    assert landed >= 2
    assert refine_output_differences(straight, crashed) == []


def test_train_killed_repeatedly_finishes_identically(tiny_overrides, tmp_path):
    common = [o for o in tiny_overrides if not o.startswith("run_dir=")] + [
        "trainer.max_steps=200", "trainer.ckpt_every=15", "trainer.eval_every=50", "data.batch_size=8"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    cmd = [sys.executable, "-m", "distill.train", *common]
    t0 = time.perf_counter()
    subprocess.run(cmd + [f"run_dir={straight}"], cwd=REPO, env=ENV, check=True, capture_output=True, timeout=900)
    took = time.perf_counter() - t0      # as for refine: fixed moments let a fast machine finish before the kill
    landed = _crash_then_finish(cmd + [f"run_dir={crashed}"], random.Random(1), kills=4,
                                window=(0.3 * took, 0.6 * took))
    assert landed >= 2

    def curve(run: Path) -> list[tuple]:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["split"], r["loss"]) for r in recs]

    assert curve(crashed) == curve(straight)                          # bit-identical, every step once
    final = "checkpoints/step_0000200/model.safetensors"
    assert (crashed / final).read_bytes() == (straight / final).read_bytes()
    leftovers = [p.name for p in crashed.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def _writer_in(folder: Path, name: str) -> subprocess.Popen:
    """A real process inside ``atomic_path(folder / name)``, holding its temporary until killed."""
    code = ("import sys, time; from refine.core.write import atomic_path\n"
            f"with atomic_path({str(folder / name)!r}) as tmp:\n"
            "    tmp.write_text('half'); print(tmp, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


def test_a_writer_sweeps_dead_processes_temporaries_once_per_folder(tmp_path):
    """Liveness is the flock a writer holds on its temporary's .lock, not host name + pid (two containers
    sharing a host name reuse pids): a killed writer's temporary goes, a live one's stays, whoever it is."""
    from refine.core import write

    dead, live = _writer_in(tmp_path, "a.json"), _writer_in(tmp_path, "b.json")
    dead.kill()
    dead.wait()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "data").write_text("old")
    killed_mid_swap = _writer_in(tmp_path, "store")          # killed between the two renames of "store"
    box = next(tmp_path.glob(".store.tmp-*"))
    (tmp_path / "store").rename(box / write.OLD)
    killed_mid_swap.kill()
    killed_mid_swap.wait()
    write.write_json_atomic(tmp_path / "x.json", {})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if not n.startswith(".b.json.tmp-")] == ["store", "x.json"] and len(names) == 3
    assert (tmp_path / "store" / "data").read_text() == "old"
    later = _writer_in(tmp_path, "d.json")
    later.kill()
    later.wait()
    write.write_json_atomic(tmp_path / "y.json", {})      # swept by the next process, not this one
    assert list(tmp_path.glob(".d.json.tmp-*"))
    live.kill()
    live.wait()
