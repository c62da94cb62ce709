"""torchrun on CPU (gloo): 2 processes train exactly like 1 process with the same global batch, for DDP (also with
gradient accumulation) and FSDP2, and checkpoints resume exactly under another number of processes (the data
position is global; FSDP's sharded checkpoints are resharded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cross_family import gpt2_style_tokenizer  # noqa: F401  (a fixture)
from tests.test_train import tiny_kd_data  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)

REPO = Path(__file__).resolve().parent.parent
STEPS = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3", "optim.lr=3e-3"]


def _run(overrides: list[str], run_dir: Path, procs: int = 1) -> dict[str, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    cmd = launcher + ["-m", "distill.train", *overrides, f"run_dir={run_dir}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {split: [r for r in records if r["split"] == split] for split in ("train", "val")}


def _assert_same(a: dict, b: dict, keys=("loss", "lm_loss", "grad_norm")) -> None:
    assert [r["step"] for r in a["train"]] == [r["step"] for r in b["train"]]
    for ra, rb in zip(a["train"], b["train"]):
        for k in keys:
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], abs=1e-5, rel=1e-5), (ra["step"], k)
    for ra, rb in zip(a["val"], b["val"], strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5), ra["step"]


def test_two_processes_match_one(tiny_overrides, tmp_path):
    one = _run(tiny_overrides + STEPS, tmp_path / "one")
    ddp = _run(tiny_overrides + STEPS, tmp_path / "ddp", procs=2)
    _assert_same(one, ddp)
    # the same global batch as 2 micro-batches of 1 row per rank: DDP syncs gradients on the last one only
    accum = _run(tiny_overrides + STEPS + ["data.batch_size=2", "data.grad_accum=2", "trainer.eval_batches=4"],
                 tmp_path / "accum", procs=2)                              # the same 8 val rows
    _assert_same(one, accum)
    fsdp = _run(tiny_overrides + STEPS + ["trainer.parallel=fsdp"], tmp_path / "fsdp", procs=2)
    _assert_same(one, fsdp)
    run = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert run["processes"] == 2 and run["parallel"] == "fsdp"
    # FSDP's checkpoints are sharded; the final one also holds the gathered weights, the 1-process run's
    from safetensors.torch import load_file

    ckpts = tmp_path / "fsdp" / "checkpoints"
    assert sorted(p.name for p in (ckpts / "step_0000003" / "dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpts / "step_0000003" / "model.safetensors").exists()

    a = load_file(tmp_path / "one" / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_ddp_checkpoint_resumes_in_one_process(tiny_overrides, tmp_path):
    full = _run(tiny_overrides + STEPS, tmp_path / "full")
    _run(tiny_overrides + STEPS, tmp_path / "split", procs=2)
    _stop_at_3(tmp_path / "split")
    resumed = _run(tiny_overrides + STEPS, tmp_path / "split")   # same folder, 1 process: steps 4-6 again
    assert [r["step"] for r in resumed["train"]] == list(range(1, 7))
    _assert_same(full, resumed)


def _stop_at_3(run_dir: Path) -> None:
    """As if the run had stopped after its step-3 checkpoint."""
    import shutil

    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_0000006")
    (ckpts / "latest").write_text("step_0000003\n")


def test_sharded_checkpoints_resume_exactly_under_any_world_size(tiny_overrides, tmp_path):
    import shutil

    fsdp = STEPS + ["trainer.parallel=fsdp"]
    full = _run(tiny_overrides + STEPS, tmp_path / "full")
    _run(tiny_overrides + fsdp, tmp_path / "two", procs=2)
    # an intermediate sharded step is no HF folder until exported; exported, it has the 1-process run's weights
    from safetensors.torch import load_file

    from distill.export import export
    from refine.core.errors import InputError
    from refine.core.paths import resolve_model

    sharded = tmp_path / "two" / "checkpoints" / "step_0000003"
    with pytest.raises(InputError, match="sharded checkpoint"):
        resolve_model(sharded)
    a = load_file(export(sharded, tmp_path / "exported") / "model.safetensors")
    b = load_file(tmp_path / "full" / "checkpoints" / "step_0000003" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    for procs, run in ((2, "two_two"), (1, "two_one")):            # FSDP 2 -> FSDP 2, FSDP 2 -> 1 process
        shutil.copytree(tmp_path / "two", tmp_path / run)
        _stop_at_3(tmp_path / run)
        resumed = _run(tiny_overrides + (fsdp if procs > 1 else STEPS), tmp_path / run, procs=procs)
        assert [r["step"] for r in resumed["train"]] == list(range(1, 7))
        _assert_same(full, resumed)
    shutil.copytree(tmp_path / "full", tmp_path / "one_two")         # 1 process -> FSDP 2: plain -> sharded
    _stop_at_3(tmp_path / "one_two")
    _assert_same(full, _run(tiny_overrides + fsdp, tmp_path / "one_two", procs=2))


def test_padded_cross_tokenizer_rows_give_one_process_loss(tiny_overrides, request, tmp_path):
    """Re-tokenized rows are padded, so the ranks' slices hold unequal numbers of targets: each rank's mean is
    weighted by its count over the ranks' mean count (``Distiller._rank_weights``), and 2 processes give the
    1-process loss, parts, tokens and gradient norm (unweighted: up to 3e-4 relative on the loss, 6e-3 on the
    gradient norm)."""
    _, student_tok = request.getfixturevalue("gpt2_style_tokenizer")      # fixtures of test_cross_family, test_train
    kd_data = request.getfixturevalue("tiny_kd_data")
    keep = [o for o in tiny_overrides if o.startswith("paths.")]
    base = ["+experiment=cross_family_kd", "+debug=tiny", *keep, *kd_data, f"model.tokenizer={student_tok}",
            "data.seq_len=112", "schedule=constant", *STEPS]
    one, two = _run(base, tmp_path / "one"), _run(base, tmp_path / "two", procs=2)
    _assert_same(one, two, keys=("loss", "lm_loss", "kd_loss", "grad_norm", "tokens"))
    assert len({r["tokens"] for r in one["train"]} - {448 * r["step"] for r in one["train"]}) > 0   # padded
