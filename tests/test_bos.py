"""One BOS rule for every model pass (issue 16): a model whose tokenizer adds BOS (Gemma) sees BOS in front of
every packed row wherever it runs: the trainer's steps and validation (so the reference LM the trainer makes is
scored the way it was trained), evaluation, the live teacher and the validation teacher (``kd.val_kl``).
Each pass is checked against the transformers scorer, which puts BOS first (``refine.scorers.hf``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama

from distill.data import val_batches
from refine.core.instances import Instances
from refine.core.tokenizer import bos_prefix, load_tokenizer, tokenizer_hash
from refine.scorers.registry import make_scorer


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny tokenizer with a BOS of its own that it adds to every text, as Gemma's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = load_tokenizer(tiny_tokenizer_dir).backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    out = tmp_path_factory.mktemp("bos_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|endoftext|>").save_pretrained(out)
    assert bos_prefix(load_tokenizer(out)) == bos
    return out


@pytest.fixture(scope="module")
def bos_model_dir(bos_tokenizer_dir, tmp_path_factory) -> Path:
    return save_tiny_llama(bos_tokenizer_dir, tmp_path_factory.mktemp("bos_model"), seed=0)


def test_trainer_and_evaluation_put_bos_first_like_the_scorer(bos_tokenizer_dir, tiny_overrides):
    """The trainer's val loss (and distill.evaluate's) equals the scorer's NLL of the saved checkpoint on the same
    rows: training, validation and scoring see the same [BOS] + row. A reference LM trained here and scored by
    refine therefore sees BOS in both (before: trained without it, scored with it)."""
    from test_train import _cfg

    from distill.evaluate import val_loss
    from distill.train import train

    cfg = _cfg(tiny_overrides + [f"model.tokenizer={bos_tokenizer_dir}", "data.seq_len=64", "trainer.max_steps=4",
                                 "trainer.eval_every=4", "trainer.ckpt_every=4"])
    summary = train(cfg)
    ckpt = Path(summary["checkpoint"])
    val = Instances(json.loads((Path(cfg.run_dir) / "run.json").read_text())["val_instances"]["path"])
    rows = torch.cat(val_batches(val, cfg.data.batch_size, cfg.trainer.eval_batches)).numpy()
    scored = make_scorer("hf", str(ckpt)).score(rows)            # BOS from the checkpoint's tokenizer
    assert summary["val_loss"] == pytest.approx(-scored.token_logprobs.astype(np.float64).mean(), abs=1e-5)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    every_row = make_scorer("hf", str(ckpt)).score(np.asarray(val.tokens))
    loss = val_loss(model, load_tokenizer(ckpt), str(val.folder), val.seq_len)["val_loss"]
    assert loss == pytest.approx(-every_row.token_logprobs.astype(np.float64).mean(), abs=1e-5)


def test_val_kl_runs_teacher_and_student_with_bos(bos_model_dir, tmp_path):
    from distill.config import KDConfig
    from distill.distributed import LossModule
    from distill.kd import Distiller
    from refine.core.forward import forward_logits

    tok = load_tokenizer(bos_model_dir)
    bos = bos_prefix(tok)

    class _Train:
        def __len__(self):
            return 2
        seq_len = 24

    distiller = Distiller(KDConfig(signal="online", teacher=str(bos_model_dir), top_k=8), _Train(),
                          tokenizer_hash(tok), torch.device("cpu"), 10, bos_id=bos)
    student = save_tiny_llama(bos_model_dir, tmp_path / "student", seed=5, hidden=64, layers=1)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(bos_model_dir).eval()
    batch = torch.as_tensor(np.random.default_rng(1).integers(0, len(tok) - 1, size=(2, 24)))
    got = distiller.val_kl(LossModule(student, distiller), [batch], None)
    with torch.no_grad():
        t = torch.log_softmax(forward_logits(teacher, batch, bos)[:, :-1].float(), -1)
        s = torch.log_softmax(forward_logits(student, batch, bos)[:, :-1].float(), -1)
    expected = ((t.exp() * (t - s)).sum(-1)).mean().item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_online_teacher_equals_the_stored_signal_under_the_students_autocast(bos_model_dir, tmp_path):
    """Issue 16: the live teacher runs in its own dtype outside the student's bf16 autocast and with its BOS, so
    its targets are the ones a stored (fp32) teacher pass gives for the same rows."""
    from distill.signal import OfflineTeacher, OnlineTeacher
    from refine.core.logits import LogitsStore, LogitsWriter, StoreHeader

    tok = load_tokenizer(bos_model_dir)
    rows = np.random.default_rng(3).integers(0, len(tok) - 1, size=(3, 32))
    scores = make_scorer("hf", str(bos_model_dir), top_k=20).score(rows)
    writer = LogitsWriter(tmp_path / "store", StoreHeader(len(tok), tokenizer_hash(tok), 0.9, 20, 31))
    writer.finish([writer.write_shard(0, scores.topk_ids, scores.topk_logprobs)])
    stored = OfflineTeacher(LogitsStore(tmp_path / "store")).signal(np.arange(3))
    teacher = OnlineTeacher(str(bos_model_dir), top_p=0.9, top_k=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        live = teacher.signal(None, torch.as_tensor(rows))
    assert live.logprobs.dtype == torch.float32
    assert torch.equal(live.mask, stored.mask) and torch.equal(live.ids, stored.ids)
    torch.testing.assert_close(live.logprobs[live.mask], stored.logprobs[stored.mask], atol=2e-3, rtol=1e-3)


def test_a_pass_keys_what_it_puts_first(bos_model_dir, tiny_model_dir, tiny_tokenizer_dir, tiny_corpus, tmp_path):
    """A scoring pass's key holds the BOS it prepends: a store scored before the model's tokenizer put BOS first
    (a Gemma converted without it) is refused, not reused; a model without BOS keys as before."""
    from refine.config import RefineConfig
    from refine.core.pack import pack
    from refine.passes import pass_key

    inst = pack(tiny_corpus / "val.jsonl", load_tokenizer(tiny_tokenizer_dir), 64, tmp_path / "inst", quiet=True)
    cfg = RefineConfig(out=str(tmp_path / "out"))
    assert pass_key(cfg, "teacher", bos_model_dir, inst)["bos_prefix"] == bos_prefix(load_tokenizer(bos_model_dir))
    assert "bos_prefix" not in pass_key(cfg, "teacher", tiny_model_dir, inst)
