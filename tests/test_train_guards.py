"""The trainer among other writers and failures, with real processes: a second trainer on one run folder
refuses naming the first (whose lock, once it is killed, the next run takes over); a checkpoint write that
fails midway (a file-size limit: EFBIG) keeps the previous checkpoint, leaves no temporary, and the rerun
ends bit-identical to an uninterrupted run; under torchrun an input error on one rank or on all ends every
rank with one line, with no gloo traceback."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _train(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.train", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900, **kw)


def _one_error_line(res: subprocess.CompletedProcess, stream: str = "stderr") -> str:
    text = getattr(res, stream)
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert res.returncode != 0 and len(errors) == 1, text[-3000:]
    return errors[0]


def _curve(run: Path) -> list[tuple]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["split"], r["loss"]) for r in records]


def test_two_trainers_one_run_name(tiny_overrides, tmp_path):
    common = [o for o in tiny_overrides if not o.startswith("run_dir=")] + [f"run_dir={tmp_path / 'run'}"]
    first = subprocess.Popen([sys.executable, "-m", "distill.train", *common, "trainer.max_steps=100000"],
                             cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "run" / "metrics.jsonl").is_file():          # training: the lock is held
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        second = _train(common + ["trainer.max_steps=4"])
        line = _one_error_line(second)
        assert second.returncode == 2
        assert f"run is being written by another trainer (host {os.uname().nodename} pid {first.pid})" in line
        assert "use another run_name" in line
    finally:
        first.send_signal(signal.SIGKILL)                                # dies holding the lock
        first.wait()
    again = _train(common + ["trainer.max_steps=4", "resume=false"])    # a dead holder's lock is taken over
    assert again.returncode == 0, again.stderr[-3000:]


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_checkpoint_write_failure_keeps_the_previous_and_the_rerun_matches(tiny_overrides, tmp_path):
    common = [o for o in tiny_overrides if not o.startswith("run_dir=")] + ["trainer.ckpt_every=10",
                                                                            "trainer.eval_every=5"]
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    for run in (straight, failed):                                      # both: 10 steps, a checkpoint at 10
        assert _train(common + [f"run_dir={run}", "trainer.max_steps=10"]).returncode == 0
    assert _train(common + [f"run_dir={straight}", "trainer.max_steps=20"]).returncode == 0
    step10 = failed / "checkpoints" / "step_0000010"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in step10.iterdir()}
    limit = (step10 / "model.safetensors").stat().st_size // 2          # the next checkpoint's weights fail
    res = _train(common + [f"run_dir={failed}", "trainer.max_steps=20"], preexec_fn=_file_size_limit(limit))
    line = _one_error_line(res)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == line    # no traceback after it
    print(f"limit {limit} B: {line}")
    assert f"cannot write {failed / 'checkpoints' / 'step_0000020'}" in line and "(EFBIG)" in line
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in step10.iterdir()} == before
    assert (failed / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    assert sorted(p.name for p in (failed / "checkpoints").iterdir()) == ["latest", "step_0000010"]
    assert [p.name for p in failed.rglob(".*") if ".tmp" in p.name or ".old" in p.name] == []
    res = _train(common + [f"run_dir={failed}", "trainer.max_steps=20"])  # room again: resumes from step 10
    assert res.returncode == 0, res.stderr[-3000:]
    assert _curve(failed) == _curve(straight)
    final = "checkpoints/step_0000020/model.safetensors"
    assert (failed / final).read_bytes() == (straight / final).read_bytes()


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "distill.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_an_input_error_under_torchrun_is_one_line(tiny_overrides, tiny_tokenizer_dir, tiny_corpus, tmp_path):
    from refine.core.pack import pack
    from refine.core.tokenizer import load_tokenizer

    inst = pack(tiny_corpus / "val.jsonl", load_tokenizer(tiny_tokenizer_dir), 64, tmp_path / "inst", quiet=True)
    base = [o for o in tiny_overrides if not o.startswith(("run_dir=", "data.seq_len="))] + [
        f"run_dir={tmp_path / 'run'}"]
    def one_line(label: str, overrides: list[str]) -> tuple[str, subprocess.CompletedProcess]:
        t0 = time.perf_counter()
        res = _torchrun(base + overrides)
        line = _one_error_line(res)
        print(f"torchrun, {label}: {time.perf_counter() - t0:.0f} s, {line}")
        out = res.stdout + res.stderr
        assert "Connection closed" not in out and "gloo" not in out.lower()
        return line, res

    # Every rank finds it (packed 64-token instances, data.seq_len 32), before any process group exists.
    line, res = one_line("seq_len error", [f"data.train={inst.folder}", "data.seq_len=32"])
    assert "holds instances of 64 tokens, but data.seq_len is 32" in line and "Traceback" not in res.stdout
    # Only rank 0 finds it (packing a malformed corpus, which it alone does): the others learn it, end alike.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first line"}\n{"text": "cut\n')
    line, _ = one_line("rank-0 error", [f"data.train={bad}", "data.seq_len=64"])
    assert "malformed JSON" in line


def test_a_full_disk_under_torchrun_is_one_line(tiny_overrides, tmp_path):
    """Rank 0 writes metrics.jsonl alone, at every step: its failed write (a file-size limit) still ends every
    rank with one line, at the next checkpoint (written by nobody: the run resumes from the one before)."""
    base = [o for o in tiny_overrides if not o.startswith("run_dir=")]
    run = tmp_path / "run"
    assert _train(base + [f"run_dir={run}", "trainer.max_steps=10", "trainer.ckpt_every=10"]).returncode == 0
    # room for Hydra's files, run.json and the plot, not for the metrics of 200 steps
    limit = max((run / "metrics.jsonl").stat().st_size * 5, (run / "schedules.png").stat().st_size * 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distill.train"]
    res = subprocess.run(cmd + base + [f"run_dir={run}", "trainer.max_steps=200", "trainer.ckpt_every=1000"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
                         preexec_fn=_file_size_limit(limit))
    line = _one_error_line(res)
    print(f"limit {limit} B under torchrun: {line}")
    assert f"cannot write {run / 'metrics.jsonl'}: File too large (EFBIG)" in line
    assert "Connection closed" not in res.stderr and "gloo" not in res.stderr.lower()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000010"]
    # room again: the rerun resumes at step 10 and the metrics (cut mid-record) hold every step once
    res = _train(base + [f"run_dir={run}", "trainer.max_steps=200", "trainer.ckpt_every=1000"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert [s for s, split, _ in _curve(run) if split == "train"] == list(range(1, 201))


def test_a_shard_write_failure_under_fsdp_is_one_line(tiny_overrides, tmp_path):
    """FSDP: every rank writes its own shard; when they cannot (a file-size limit), every rank ends with one line,
    and the previous checkpoint stays the latest, with no temporary left."""
    base = [o for o in tiny_overrides if not o.startswith("run_dir=")] + ["trainer.parallel=fsdp",
                                                                          "trainer.ckpt_every=5"]
    run = tmp_path / "run"
    assert _torchrun(base + [f"run_dir={run}", "trainer.max_steps=5"]).returncode == 0
    shard = run / "checkpoints" / "step_0000005" / "dcp" / "__0_0.distcp"
    limit = shard.stat().st_size // 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distill.train"]
    res = subprocess.run(cmd + base + [f"run_dir={run}", "trainer.max_steps=10"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600, preexec_fn=_file_size_limit(limit))
    line = _one_error_line(res)
    print(f"limit {limit} B, FSDP shards: {line}")
    assert f"cannot write {run / 'checkpoints' / 'step_0000010' / 'dcp'}: File too large (EFBIG)" in line
    assert "Traceback" not in res.stdout and "gloo" not in res.stderr.lower()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000005"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000005"]
