"""The refine stage end to end on tiny real models: outputs, reuse, re-selection and crash-resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from refine.__main__ import CONF_DIR, refine
from refine.config import to_refine_config
from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.logits import LogitsStore
from refine.select import random_control
from tests.conftest import REPO, refine_output_differences, save_tiny_llama, train_tiny_tokenizer

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)


def _cfg(overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_refine_config(compose("refine", overrides=overrides))


@pytest.fixture
def overrides(refine_overrides):
    return refine_overrides


def _mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}


def test_refine_outputs_reuse_reselect_and_resume(overrides, tmp_path):
    out = tmp_path / "out"
    manifest = refine(_cfg(overrides))
    scored = Instances(out / "instances_all")
    kept_inst = Instances(out / "instances")
    s = np.load(out / "scores.npz")
    n = len(scored)
    assert manifest["instances_scored"] == n and len(kept_inst) == round(0.5 * n)
    assert np.allclose(s["score"], s["ref_nll"].astype(np.float64) - s["teacher_nll"])
    kept = s["kept"]
    assert (np.diff(kept) > 0).all()                                         # corpus order
    assert set(kept) == set(np.argsort(-s["score"], kind="stable")[: len(kept)])
    assert np.array_equal(np.asarray(kept_inst.tokens), np.asarray(scored.tokens)[kept])
    logits, full = LogitsStore(out / "logits", verify=True), LogitsStore(out / "teacher" / "logits")
    assert len(logits) == len(kept) == len(full) // 2
    for j in (0, len(kept) - 1):
        # The kept rows re-encoded (zstd codec: per-shard level values): same ids, values within one level.
        a, b = logits[j], full[int(kept[j])]
        assert np.array_equal(a.counts, b.counts) and np.array_equal(a.ids, b.ids)
        assert np.allclose(np.exp(a.logprobs / 2), np.exp(b.logprobs / 2), atol=1.5 / 48)
    # The same teacher pass also wrote RS-KD samples (from its top-20 candidates), kept rows alike.
    rs, rs_full = LogitsStore(out / "logits_rs", verify=True), LogitsStore(out / "teacher" / "logits_rs")
    assert rs.header.kind == "sampled" and rs.header.samples == 8 and len(rs) == len(kept)
    assert np.array_equal(rs[0].ids, rs_full[int(kept[0])].ids) and (rs[0].counts <= 8).all()
    assert 0.5 < manifest["report"]["logits_rs_mean_kept_mass"] <= 1.0
    # The text export: the kept rows as document pieces (refine.core.text_export), every kept row in one.
    records = [json.loads(x) for x in (out / "refined.jsonl").read_text().splitlines()]
    assert sorted({r for rec in records for r in rec["rows"]}) == kept.tolist()
    assert not any("<|endoftext|>" in rec["text"] for rec in records)
    # The equal-size random control (seeded by select.seed), as instances and as text.
    control = random_control(len(s["score"]), 0.5, seed=0)
    assert np.array_equal(np.asarray(Instances(out / "instances_random").tokens), np.asarray(scored.tokens)[control])
    rand_records = [json.loads(x) for x in (out / "random.jsonl").read_text().splitlines()]
    assert sorted({r for rec in rand_records for r in rec["rows"]}) == control.tolist()
    assert set(control) != set(kept)
    assert (out / "score_hist.png").stat().st_size > 1000 and "Highest-scored" in (out / "report.md").read_text()
    div = manifest["report"]["diversity"]
    assert 0 < div["scored"] < 2 and 0 < div["refined"] < 2 and "Diversity" in (out / "report.md").read_text()

    # Rerun: both passes reused, outputs identical.
    before = {k: _mtimes(out / k) for k in ("teacher", "reference")}
    snapshot = ((out / "scores.npz").read_bytes(), (out / "logits" / "shard-00000.bin").read_bytes(),
                (out / "teacher" / "logits_rs" / "shard-00001.bin").read_bytes())
    refine(_cfg(overrides))
    assert {k: _mtimes(out / k) for k in ("teacher", "reference")} == before
    assert ((out / "scores.npz").read_bytes(), (out / "logits" / "shard-00000.bin").read_bytes(),
            (out / "teacher" / "logits_rs" / "shard-00001.bin").read_bytes()) == snapshot

    # Another alpha re-selects from the saved scores without rescoring.
    refine(_cfg(overrides + ["select.alpha=0.25"]))
    assert {k: _mtimes(out / k) for k in ("teacher", "reference")} == before
    assert len(Instances(out / "instances")) == round(0.25 * n) == len(LogitsStore(out / "logits"))

    # A crash in the middle of the teacher pass: shard 1 never finished. The rerun scores only that shard.
    for name in ("shard-00001.json", "nll-00001.npy", "pass.json"):
        (out / "teacher" / name).unlink()
    refine(_cfg(overrides))
    after = _mtimes(out / "teacher")
    assert after["shard-00000.json"] == before["teacher"]["shard-00000.json"]
    assert after["shard-00001.json"] != before["teacher"]["shard-00001.json"]
    assert ((out / "scores.npz").read_bytes(), (out / "logits" / "shard-00000.bin").read_bytes(),
            (out / "teacher" / "logits_rs" / "shard-00001.bin").read_bytes()) == snapshot

    # A teacher with another tokenizer (e.g. paths=gemma without name=gemma) never overwrites this output.
    other = save_tiny_llama(train_tiny_tokenizer(tmp_path / "tok2", vocab_size=300, seed=5), tmp_path / "other", 0)
    with pytest.raises(InputError, match="another tokenizer; choose another name"):
        refine(_cfg(overrides + [f"teacher.path={other}", f"reference.path={other}"]))
    assert (out / "scores.npz").read_bytes() == snapshot[0]


@pytest.mark.parametrize("extra, match", [
    (["corpus=/no/such/corpus.jsonl"], "corpus not found"),
    (["reference.path=/no/such/model"], "no model at /no/such/model"),
    (["select.alpah=0.3"], "alpah"),
])
def test_refine_cli_errors_are_one_line(overrides, extra, match):
    res = subprocess.run([sys.executable, "-m", "refine", *overrides, *extra], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], res.stderr


def _progress_only(stderr: str) -> bool:
    """Nothing on the terminal's stderr but refine's progress lines (``  teacher: 48/64 instances ...``)."""
    return all(re.match(r"  (teacher|reference): [\d,]+/[\d,]+ instances ", ln) for ln in stderr.splitlines())


def test_vllm_noise_goes_to_the_log(overrides, tmp_path):
    """The CLI on the vLLM backend (as `make refine` runs it): its warnings, NUMA notes and tracebacks land in
    <out>/logs/teacher.log, the terminal shows progress and refine's own lines only."""
    out = tmp_path / "vllm"
    args = [o for o in overrides if not o.startswith(("teacher.backend", "out="))] + [
        "teacher.backend=vllm", "+teacher.engine.enforce_eager=true", "pack.max_instances=32",
        "dedup.diversity=false", f"out={out}"]
    res = subprocess.run([sys.executable, "-m", "refine", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert res.returncode == 0 and "kept 16 of 32" in res.stdout, res.stderr[-3000:]
    assert _progress_only(res.stderr) and "teacher: 32/32 instances (100%)" in res.stderr, res.stderr
    log = (out / "logs" / "teacher.log").read_text().splitlines()
    assert log[0].startswith("==== ") and "teacher pass" in log[0]
    assert any("vllm" in ln.lower() and "warning" in ln.lower() for ln in log[1:]), log


def test_near_duplicates_are_removed_before_scoring(overrides):
    # The plumbing: with a loose threshold the (random-init) reference embeddings call many instances
    # near-duplicates; scoring then runs on the survivors only. (near_duplicates itself: tests/test_dedup.py.)
    manifest = refine(_cfg(overrides + ["dedup.enabled=true", "dedup.threshold=0.5"]))
    dedup = manifest["report"]["dedup"]
    assert dedup["after"] < dedup["before"] and manifest["instances_scored"] == dedup["after"]


def test_two_shards_merged_equal_one_unsharded_run_byte_for_byte(overrides, tmp_path):
    """`--shard 0/2` and `--shard 1/2` in two folders (two machines), then merge_from into a third: every output
    file equals the unsharded run's, but for those that record timings."""
    overrides = overrides + ["pack.max_instances=96"]                # 6 scoring shards, 3 per part
    out = tmp_path / "out"
    refine(_cfg(overrides))
    parts = [tmp_path / "part0", tmp_path / "part1"]
    for i, part in enumerate(parts):
        workers = [f"teacher.write_workers={3 - 2 * i}"]                # part 0 writes its 3 shards concurrently
        res = subprocess.run([sys.executable, "-m", "refine", *overrides, *workers, f"out={part}", "--shard", f"{i}/2"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0 and f"part {i}/2 scored" in res.stdout, res.stderr[-2000:]
        assert _progress_only(res.stderr) and (part / "logs" / f"teacher.part-{i}-of-2.log").is_file(), res.stderr
        assert not (part / "teacher" / "pass.json").exists() and not (part / "instances").exists()
    merged = tmp_path / "merged"
    refine(_cfg(overrides + [f"out={merged}", f"merge_from=[{parts[0]},{parts[1]}]"]))
    assert refine_output_differences(out, merged) == []
    with pytest.raises(InputError, match="another model"):
        refine(_cfg(overrides + [f"out={tmp_path / 'bad'}", f"merge_from=[{parts[0]}]", "logits.top_k=8"]))


def test_a_slurm_array_in_one_folder_equals_one_run_and_its_last_task_finishes(overrides, tmp_path):
    """tools/refine_array.sbatch as two array tasks of one job on this machine (Slurm's variables set by hand),
    running at once into one shared folder: the task that ends last finishes the run, whose outputs equal an
    unsharded run's; a task run again when all is done does nothing."""
    overrides = overrides + ["pack.max_instances=96"]                # 6 scoring shards, 3 per task
    one = tmp_path / "out"
    refine(_cfg(overrides))
    shared = tmp_path / "shared"
    reference = next(o for o in overrides if o.startswith("reference.path=")).split("=", 1)[1]
    rest = [o for o in overrides if not o.startswith(("out=", "reference.path="))]
    env = {**os.environ, "OUT": str(shared), "REFERENCE": reference, "PYTHON": sys.executable,
           "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1"}

    def task(i: int) -> subprocess.Popen:
        return subprocess.Popen(["bash", "tools/refine_array.sbatch", *rest], cwd=REPO, text=True,
                                env={**env, "SLURM_ARRAY_TASK_ID": str(i)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    tasks = [task(0), task(1)]
    outs = [t.communicate(timeout=900) for t in tasks]
    for i, (t, (stdout, stderr)) in enumerate(zip(tasks, outs)):
        assert t.returncode == 0 and f"shard=auto: part {i}/2 (Slurm array task {i}, 2 tasks)" in stdout, stderr
    waited = [i for i, (stdout, _) in enumerate(outs) if f"part {i}/2 scored" in stdout]
    assert len(waited) == 1, [o[0][-600:] for o in outs]                     # the other one finished the run
    assert refine_output_differences(one, shared) == []
    before = {p: p.stat().st_mtime_ns for p in shared.rglob("*")          # all but its logs and lock file
              if p.is_file() and "logs" not in p.parts and p.name != ".writer.lock"}
    again = task(waited[0])
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0 and "holds the finished run (same scoring settings); nothing to do" in stdout, stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
