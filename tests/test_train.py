"""The trainer on tiny real assets: loss falls, checkpoints are plain HF folders (kill -9: test_crash_safety.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from distill.config import to_config
from distill.data import open_instances, val_batches
from distill.train import CONF_DIR, train
from distill.trainer import evaluate
from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.tokenizer import load_tokenizer

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)

REPO = Path(CONF_DIR).parent


def _cfg(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_config(compose("train", overrides=overrides))


def _records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_smoke_loss_falls_and_checkpoint_reloads(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides + ["trainer.max_steps=60", "trainer.eval_every=20", "trainer.ckpt_every=30",
                                 "optim.lr=3e-3"])
    summary = train(cfg)
    run_dir = Path(cfg.run_dir)
    train_losses = [r["loss"] for r in _records(run_dir, "train")]
    val = _records(run_dir, "val")
    assert len(train_losses) == 60 and [r["step"] for r in val] == [20, 40, 60]
    assert train_losses[0] == pytest.approx(math.log(400), rel=0.05)   # untrained: ~uniform over the vocab
    assert val[-1]["loss"] < val[0]["loss"] < train_losses[0] - 1.0     # and it learns
    # The final checkpoint is a plain HF folder: AutoModelForCausalLM loads it and gets the same val loss.
    from transformers import AutoModelForCausalLM

    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == "step_0000060" and (ckpt / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = load_tokenizer(ckpt)
    vset = open_instances(cfg.data.val, tok, cfg.data.seq_len, cfg.paths.cache, quiet=True)
    loss = evaluate(model, val_batches(vset, cfg.data.batch_size, cfg.trainer.eval_batches), torch.device("cpu"),
                    None)
    assert loss == pytest.approx(summary["val_loss"], abs=1e-6)
    assert len(list((run_dir / "checkpoints").glob("step_*"))) == 2     # keep_checkpoints
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"]["model"]["name"] == "llama_tiny" and run["train_instances"]["count"] > 0


def test_resume_refuses_a_different_model(tiny_overrides):
    train(_cfg(tiny_overrides + ["trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.eval_every=4"]))
    with pytest.raises(InputError, match="different model"):
        train(_cfg(tiny_overrides + ["trainer.max_steps=8", "model.hidden_size=32"]))


@pytest.fixture
def tiny_kd_data(tiny_tokenizer_dir, tiny_corpus, tiny_model_dir, tmp_path):
    """Packed tiny train instances and the tiny teacher's top-0.95-16 logits for them (a refine in miniature)."""
    from refine.core.logits import LogitsWriter, StoreHeader
    from refine.core.pack import pack
    from refine.core.tokenizer import tokenizer_hash
    from refine.scorers.registry import make_scorer

    tok = load_tokenizer(tiny_tokenizer_dir)
    inst = pack(tiny_corpus / "train.jsonl", tok, 64, tmp_path / "inst", quiet=True)
    scores = make_scorer("hf", str(tiny_model_dir), top_k=16).score(np.asarray(inst.tokens))
    writer = LogitsWriter(tmp_path / "logits", StoreHeader(len(tok), tokenizer_hash(tok), 0.95, 16, 63))
    writer.finish([writer.write_shard(0, scores.topk_ids, scores.topk_logprobs)], instances=inst)
    return [f"data.train={tmp_path / 'inst'}", f"kd.logits={tmp_path / 'logits'}", f"kd.teacher={tiny_model_dir}",
            "kd.top_k=16", "kd.top_p=0.95"]


def test_kd_offline_and_online_runs(tiny_overrides, tiny_kd_data, tmp_path):
    base = [o for o in tiny_overrides if not o.startswith(("+experiment", "run_dir"))] + tiny_kd_data + [
        "trainer.max_steps=30", "trainer.eval_every=10", "optim.lr=3e-3", "kd.alpha.warmup_steps=5"]
    off = _cfg(["+experiment=kd_wsd", *base, f"run_dir={tmp_path / 'off'}"])
    train(off)
    recs = _records(tmp_path / "off", "train")
    assert {"lm_loss", "kd_loss", "alpha", "tau"} <= set(recs[0])
    assert recs[0]["alpha"] < recs[15]["alpha"] == pytest.approx(0.9) and recs[-1]["alpha"] == pytest.approx(0.0)
    kd = [r["kd_loss"] for r in recs]
    assert np.mean(kd[-5:]) < np.mean(kd[:5]) - 0.1                      # the student fits the teacher's targets
    assert all("kl_teacher" in r for r in _records(tmp_path / "off", "val"))
    assert (tmp_path / "off" / "schedules.png").stat().st_size > 1000
    on = _cfg(["+experiment=kd_online", *base, "trainer.max_steps=3", f"run_dir={tmp_path / 'on'}"])
    train(on)
    first_off = _records(tmp_path / "off", "train")[0]
    first_on = _records(tmp_path / "on", "train")[0]
    # Same batch, same student init, same teacher: stored (float16) and live logits give the same KD loss.
    assert first_on["kd_loss"] == pytest.approx(first_off["kd_loss"], rel=2e-3)


def test_kd_refuses_misaligned_logits(tiny_overrides, tiny_kd_data, tiny_corpus, tiny_tokenizer_dir, tmp_path,
                                      capsys):
    from refine.core.logits.tools import main as store_cli
    from refine.core.pack import pack

    base = [o for o in tiny_overrides if not o.startswith("+experiment")] + tiny_kd_data
    with pytest.raises(InputError, match="not aligned"):           # logits of other instances than data.train
        train(_cfg(["+experiment=kd_offline", *base, f"data.train={tiny_corpus / 'val.jsonl'}"]))
    # Same count and length, other text (the documents in another order): refused by content, not count.
    docs = (tiny_corpus / "train.jsonl").read_text().splitlines()
    (tmp_path / "shuffled.jsonl").write_text("\n".join(docs[::-1]) + "\n")
    other = pack(tmp_path / "shuffled.jsonl", load_tokenizer(tiny_tokenizer_dir), 64, tmp_path / "other", quiet=True)
    assert len(other) == len(Instances(tmp_path / "inst"))
    with pytest.raises(InputError, match="other instances than data.train") as e:
        train(_cfg(["+experiment=kd_offline", *base, f"data.train={tmp_path / 'other'}"]))
    assert "\n" not in str(e.value)
    # A store written before the record: refused until linked by hand, once.
    meta = json.loads((tmp_path / "logits" / "store.json").read_text())
    del meta["instances"]
    (tmp_path / "logits" / "store.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="link it once"):
        train(_cfg(["+experiment=kd_offline", *base]))
    store_cli(["link", str(tmp_path / "logits"), str(tmp_path / "inst")])
    assert "linked" in capsys.readouterr().out
    linked = json.loads((tmp_path / "logits" / "store.json").read_text())["instances"]
    assert linked["tokens_sha256"] == Instances(tmp_path / "inst").index["tokens_sha256"]
    with pytest.raises(SystemExit):                                 # a linked store cannot be re-linked elsewhere
        store_cli(["link", str(tmp_path / "logits"), str(tmp_path / "other")])


def test_early_stopping_ends_the_run_and_a_rerun_does_not_train_on(tiny_overrides):
    """No validation can improve on the first by 100 nats: with patience 2 the run ends at the third (step 15 of
    40), saved there as its final checkpoint; the same command again finds it finished and trains nothing."""
    overrides = tiny_overrides + ["trainer.max_steps=40", "trainer.eval_every=5", "trainer.ckpt_every=20",
                                  "trainer.early_stop_patience=2", "trainer.early_stop_min_delta=100"]
    summary = train(_cfg(overrides))
    run_dir = Path(_cfg(overrides).run_dir)
    assert summary["steps"] == 15 and summary["stopped_early"] is True and summary["best_step"] == 5
    assert Path(summary["checkpoint"]).name == "step_0000015"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000015"
    assert [r["step"] for r in _records(run_dir, "val")] == [5, 10, 15]
    again = train(_cfg(overrides))
    assert again["steps"] == 15 and again["stopped_early"] is True
    assert len(_records(run_dir, "train")) == 15
    assert again["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-6)
    # with any real improvement allowed, the same run goes to max_steps
    full = train(_cfg([o for o in overrides if "min_delta" not in o and "run_dir" not in o]
                      + [f"run_dir={run_dir.parent / 'full'}"]))
    assert full["steps"] == 40 and full["stopped_early"] is False
