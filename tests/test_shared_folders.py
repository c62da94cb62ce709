"""Many writers, one refine folder, a full disk, re-selection: real concurrent processes.

A second run with other settings never destroys or mixes into the first's folder (it refuses with one line);
shard parts with the same settings still write one folder together; a write that fails midway (a file-size
limit: EFBIG, as a full disk gives ENOSPC) leaves every finished shard as it was and no temporary, and the rerun
finishes exactly as an uninterrupted run; select_only re-selects from the saved scores without scoring."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import refine.pipeline as refine_main
from refine.__main__ import CONF_DIR, refine
from refine.config import to_refine_config
from tests.conftest import REPO, refine_output_differences

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _cfg(overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_refine_config(compose("refine", overrides=overrides))


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()     # lock, logs: who, not what
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".writer.lock"
            and p.relative_to(folder).parts[0] != "logs"}


def _refine_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refine", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900, **kw)


def _one_error_line(res: subprocess.CompletedProcess, alone: bool = True) -> str:
    """The run's one ``error:`` line, its last; ``alone``: nothing else on stderr (a scoring child's output goes
    to <out>/logs/; only its progress may show above)."""
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert res.returncode == 2 and errors == lines[-1:] and (len(lines) == 1 or not alone), res.stderr[-3000:]
    return lines[-1]


@pytest.fixture
def small(refine_overrides):
    """6 scoring shards of 16 instances."""
    return [o for o in refine_overrides if not o.startswith("out=")] + ["pack.max_instances=96"]


def test_other_settings_refused_same_settings_share_the_folder(small, tmp_path):
    shared = tmp_path / "shared"
    straight = tmp_path / "straight"
    refine(_cfg(small + [f"out={straight}"]))
    first = subprocess.Popen([sys.executable, "-m", "refine", *small, f"out={shared}", "--shard", "0/2"], cwd=REPO,
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = shared / ".writer.lock"
        deadline = time.time() + 120
        while not ((shared / "scoring.json").is_file() and lock.is_file() and str(first.pid) in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        # While part 0 runs: part 1 with another dtype refuses (the folder's record names the difference) ...
        line = _one_error_line(_refine_cli(small + [f"out={shared}", "--shard", "1/2", "teacher.dtype=bfloat16"]))
        assert "teacher.dtype (float32 in the folder, bfloat16 here)" in line and "overwrite=true" in line, line
        # ... an unsharded run (which would score part 0's shards too) refuses, naming the writer ...
        line = _one_error_line(_refine_cli(small + [f"out={shared}"]))
        assert f"being written by another refine run (host {os.uname().nodename} pid {first.pid})" in line, line
        assert first.poll() is None                                       # both refusals came while it ran
        # ... and part 1 with the same settings writes the same folder at the same time, as designed (the part
        # that finds every shard finished when it ends also finishes the passes and selects).
        part1 = _refine_cli(small + [f"out={shared}", "--shard", "1/2"])
        assert part1.returncode == 0 and ("part 1/2 scored" in part1.stdout or "kept 48" in part1.stdout), \
            part1.stderr[-3000:]
        out, err = first.communicate(timeout=900)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    scored = {k: v for k, v in _hashes(shared).items() if k.startswith(("teacher/", "reference/"))}
    assert sum(k.endswith(".bin") for k in scored) == 12                 # 6 shards x (top-p-k + RS-KD)
    # After both parts: another dtype, now with nobody writing, still refuses and changes nothing.
    line = _one_error_line(_refine_cli(small + [f"out={shared}", "teacher.dtype=bfloat16"]))
    assert "teacher.dtype (float32 in the folder, bfloat16 here)" in line
    assert {k: v for k, v in _hashes(shared).items() if k in scored} == scored
    # The finishing run selects from the shards both parts wrote: the uninterrupted run's outputs exactly.
    res = _refine_cli(small + [f"out={shared}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert refine_output_differences(straight, shared) == []
    # overwrite=true replaces the folder on purpose (nobody else writes it now).
    res = _refine_cli(small + [f"out={shared}", "teacher.dtype=bfloat16", "overwrite=true"])
    assert res.returncode == 0 and "overwrite=true: replacing" in res.stdout, res.stderr[-3000:]
    assert '"dtype": "bfloat16"' in (shared / "scoring.json").read_text()


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                   # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_write_failure_keeps_finished_shards_and_the_rerun_matches(small, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "out"
    refine(_cfg(small + [f"out={straight}"]))
    part = _refine_cli(small + [f"out={out}", "--shard", "0/2"])           # shards 0, 2, 4 finished
    assert part.returncode == 0, part.stderr[-3000:]
    before = _hashes(out)
    bins = [p.stat().st_size for p in (out / "teacher").glob("logits*/shard-*.bin")]
    smaller = [p.stat().st_size for p in (out / "teacher").rglob("*") if p.is_file() and p.suffix != ".bin"]
    limit = min(bins) // 2                 # every scoring shard's logits fail; its json and NLL would fit
    assert max(smaller) < limit, (max(smaller), limit)
    res = _refine_cli(small + [f"out={out}"], preexec_fn=_file_size_limit(limit))
    line = _one_error_line(res)                                           # the child's noise is in logs/
    print(f"limit {limit} B: {line}")
    assert f"cannot write {out / 'teacher'}" in line and "File too large (EFBIG)" in line and "/logits" in line
    after = _hashes(out)
    assert {k: after.get(k) for k in before} == before                   # every finished shard as it was
    assert [k for k in after if k not in before] == []                   # and no temporary, no half shard
    res = _refine_cli(small + [f"out={out}"])                             # space is back
    assert res.returncode == 0, res.stderr[-3000:]
    assert refine_output_differences(straight, out) == []


def test_select_only_never_scores(small, refine_overrides, tmp_path, monkeypatch):
    out, again = tmp_path / "out", tmp_path / "again"
    refine(_cfg(small + [f"out={out}"]))
    shutil.copytree(out, again)
    refine(_cfg(small + [f"out={again}", "select.alpha=0.25"]))          # the full path, passes reused
    scored = {k: os.stat(out / k).st_mtime_ns for k in _hashes(out) if k.startswith(("teacher/", "reference/",
                                                                                      "instances_all/"))}

    def never(*a, **k):
        raise AssertionError("select_only packed, embedded or scored")

    for name in ("score", "pack", "embeddings", "_subset"):
        monkeypatch.setattr(refine_main, name, never)
    # As `make select ALPHA=0.25` runs it: without the scoring run's pack.max_instances=96 (the folder knows it).
    full = [o for o in refine_overrides if not o.startswith("out=")]
    refine(_cfg(full + [f"out={out}", "select_only=true", "select.alpha=0.25"]))
    assert {k: os.stat(out / k).st_mtime_ns for k in scored} == scored
    assert refine_output_differences(again, out) == []
    monkeypatch.undo()
    t0 = time.perf_counter()
    res = _refine_cli([f"out={out}", "select_only=true", "select.alpha=0.3"])
    assert res.returncode == 0 and "nothing rescored" in res.stdout, res.stderr[-3000:]
    print(f"select_only CLI: {time.perf_counter() - t0:.1f} s")
    assert {k: os.stat(out / k).st_mtime_ns for k in scored} == scored
    line = _one_error_line(_refine_cli([f"out={tmp_path / 'nothing'}", "select_only=true"]))
    assert "holds no saved scores to select from" in line
    assert list((tmp_path / "nothing").iterdir()) == []                  # (Hydra makes its run folder, empty)
