"""Hostile inputs not covered where their module is tested (the full list, with where each is tested, is in
README.md "Bad input"): a 10 MB single document, a one-token corpus, a non-finite loss (stop and skip)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refine.errors import InputError
from refine.pack import pack
from refine.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_10_mb_single_document_is_packed_whole(tiny_tokenizer_dir, tmp_path):
    """One document of 10 MB: tokenized, packed into full instances, nothing lost (every token is counted)."""
    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "the", "a"], size=2_000_000)
    text = " ".join(words)[:10_000_000]
    corpus = _jsonl(tmp_path / "big.jsonl", [{"id": "big", "text": text}])
    tok = load_tokenizer(tiny_tokenizer_dir)
    inst = pack(corpus, tok, 64, tmp_path / "p", quiet=True)
    assert inst.index["documents"] == 1 and len(inst) == inst.index["stream_tokens"] // 64
    # the packed rows are the document's tokens in order: they decode back to the text (the < 64-token tail
    # that does not fill an instance is the only part not in a row, as for any packed corpus)
    decoded = tok.decode(np.asarray(inst.tokens).reshape(-1).tolist())
    assert text.startswith(decoded) and len(text) - len(decoded) < 64 * 8


def test_a_one_token_corpus_is_one_clear_line(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    corpus = _jsonl(tmp_path / "one.jsonl", [{"text": "a"}])
    res = subprocess.run([sys.executable, "-m", "distill.train", "+experiment=lm_baseline", "+debug=tiny",
                          f"model.tokenizer={tiny_tokenizer_dir}", f"paths.corpus={tiny_corpus}",
                          f"data.train={corpus}", f"paths.cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "too small" in lines[0], res.stderr


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_policy(tiny_overrides, monkeypatch, policy):
    """A NaN loss at step 3: ``stop`` ends the run with one error line before any update is applied; ``skip``
    drops that batch's update, logs it, and trains on."""
    from hydra import compose, initialize_config_dir

    from distill import kd
    from distill.config import to_config
    from distill.train import CONF_DIR, train

    real = kd.Distiller.loss

    def poisoned(self, model, batch, rows, step):
        loss, parts = real(self, model, batch, rows, step)
        return (loss * float("nan"), parts) if step == 2 else (loss, parts)

    monkeypatch.setattr(kd.Distiller, "loss", poisoned)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose("train", overrides=tiny_overrides + ["trainer.max_steps=5",
                                                                     f"trainer.nan_policy={policy}"]))
    run_dir = Path(cfg.run_dir)
    if policy == "stop":
        with pytest.raises(InputError, match="non-finite training loss or gradient at step 3"):
            train(cfg)
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        return
    train(cfg)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["split"] == "train"]
    assert [r.get("skipped", 0) for r in train_recs] == [0, 0, 1, 0, 0]
    assert all(math.isfinite(r["loss"]) for r in train_recs if not r.get("skipped"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_0000005")
    assert all(torch.isfinite(p).all() for p in model.parameters())
