"""The reference sized to the job (refine.reference_size): the shape MiniPLM's ratio gives for real teachers'
configs, parameter counts equal to the trainer's own models, a budget that follows D_ref."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from distill.config import ModelConfig
from distill.models import count_params
from refine.config import RefSplitConfig
from refine.reference_size import Shape, plan, scaled, teacher_shape

SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "tie_word_embeddings": True,
                "rope_parameters": {"rope_theta": 100000.0}}
QWEN_1_8B = {"model_type": "qwen2", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
             "num_key_value_heads": 16, "intermediate_size": 5504, "tie_word_embeddings": False, "rope_theta": 1e6}


def _folder(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_the_parameter_formula_is_the_trainers(arch, tied):
    s = Shape(arch, 192, 3, 3, 1, 64, 512, 1000, tied)
    cfg = ModelConfig(arch=arch, hidden_size=192, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=512,
                      tie_word_embeddings=tied, tokenizer="unused")
    assert s.params() == count_params(cfg, 1000)


def test_miniplms_own_pair_comes_out_near_its_104m(tmp_path):
    """Qwen-1.8B (151,936 ids, untied) at 1/17: MiniPLM trained a 104M reference for it."""
    shape, family, theta = teacher_shape(_folder(tmp_path, QWEN_1_8B), 151936)
    assert shape.params() == pytest.approx(1.84e9, rel=0.02) and family == "qwen2" and theta == 1e6
    ref = scaled(shape, shape.params() / 17)
    assert ref.arch == "qwen2" and ref.head_dim == 128 and ref.params() == pytest.approx(104e6, rel=0.35)


def test_a_smollm2_teacher_gets_a_narrow_llama_of_its_gqa(tmp_path):
    shape, _, theta = teacher_shape(_folder(tmp_path, SMOLLM2_135M), 49152)
    assert shape.params() == pytest.approx(134.5e6, rel=0.01) and theta == 1e5
    ref = scaled(shape, shape.params() / 17)
    assert (ref.hidden, ref.heads, ref.kv_heads, ref.head_dim) == (128, 2, 1, 64)
    assert abs(math.log(ref.params() / (shape.params() / 17))) < 0.25      # within 25% of 1/17


def _plan(tmp_path, d_ref_tokens: int, **kw):
    cfg = RefSplitConfig(**kw)
    d_ref = {"train": {"tokens": d_ref_tokens, "documents": 1}, "val": {"tokens": d_ref_tokens // 9, "documents": 1}}
    folder = _folder(tmp_path, SMOLLM2_135M)
    return plan(cfg, folder, 49152, d_ref, 256)


def test_the_budget_follows_d_ref_between_its_bounds(tmp_path):
    small = _plan(tmp_path, 190_000)                       # Brown-sized: repeated up to min_train_tokens
    assert small.train_tokens >= 2_000_000 and small.batch_size == 8 and small.patience == 3
    assert small.eval_every * 25 <= small.max_steps + 25 and 10 <= small.warmup_steps < small.max_steps
    big = _plan(tmp_path, 5_000_000_000)                   # MiniPLM's D_ref: one pass, a large batch
    assert big.train_tokens == pytest.approx(5e9, rel=0.01) and big.batch_size == 512
    assert big.max_steps == pytest.approx(5e9 / (512 * 256), rel=0.01) and big.warmup_steps == 762
    capped = _plan(tmp_path, 5_000_000_000, max_train_tokens=100_000_000, epochs=2.0)
    assert capped.train_tokens == pytest.approx(1e8, rel=0.01)
    assert "model.num_layers=" in " ".join(small.overrides()) and "trainer.early_stop_patience=3" in small.overrides()


def test_a_config_without_a_shape_is_one_line(tmp_path):
    from refine.core.errors import InputError

    with pytest.raises(InputError, match="ref_split.sizing=fixed"):
        plan(RefSplitConfig(), _folder(tmp_path, {"model_type": "mamba"}), 100,
             {"train": {"tokens": 1}, "val": {"tokens": 1}}, 64)


def test_the_estimate_is_finite_and_grows_with_the_budget(tmp_path):
    from refine.reference_size import estimate_seconds

    a = _plan(tmp_path, 190_000)
    b = SimpleNamespace(**{**a.__dict__, "train_tokens": a.train_tokens * 10})
    b.params, b.shape = a.params, a.shape
    ta, tb = estimate_seconds(a, "cpu", 0.05), estimate_seconds(b, "cpu", 0.05)
    assert 0 < ta < tb and math.isfinite(tb)
