"""Students: causal LMs built from scratch with transformers, from small size configs.

``model.arch`` picks the family: ``llama`` (the default; the teacher's family), ``qwen2`` (grouped-query
attention with QKV biases) or ``mamba`` (a state-space model, no attention), so cross-family runs use a student
of another architecture and, with ``model.tokenizer``, another vocabulary. Sizes live in ``conf/model/``:
``llama_tiny`` (tests), ``llama_small`` (CPU demos), ``qwen2_small`` and ``mamba_small`` (cross-family, GPT-2
tokenizer), ``reference`` (MiniPLM's small reference LM) and ``pd_330m`` ... ``pd_6_8b``, the student sizes of
the pre-training-distillation paper's scaling study. Their shapes are ours, chosen so the parameter counts match
the paper's sizes with the paper's GLM-4 vocabulary (151,552); with the 49k SmolLM2 vocabulary the counts are
lower. Print them::

    python -m distill.models
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MambaConfig, PretrainedConfig, Qwen2Config

from distill.config import ModelConfig
from refine.core.errors import InputError

SIZES_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"


def hf_config(cfg: ModelConfig, vocab_size: int, bos_id: int | None, eos_id: int) -> PretrainedConfig:
    """The transformers config of ``cfg`` (arch + size) with the tokenizer's vocabulary and special ids."""
    common = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.init_std,
                  bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    if cfg.arch == "mamba":
        # A Mamba block's width is expand * hidden (intermediate_size is not used); no heads, no positions.
        return MambaConfig(**common, state_size=cfg.state_size, expand=cfg.expand, conv_kernel=4)
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise InputError(f"model {cfg.name}: hidden_size {cfg.hidden_size} must divide by num_heads "
                         f"{cfg.num_heads}, which must divide by num_kv_heads {cfg.num_kv_heads}")
    attn = dict(intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                rope_theta=cfg.rope_theta)
    if cfg.arch == "qwen2":
        return Qwen2Config(**common, **attn, use_sliding_window=False)
    return LlamaConfig(**common, **attn)


def build_student(cfg: ModelConfig, tokenizer, seed: int):
    """A freshly initialised student whose vocabulary is the tokenizer's (so it can read teacher logits)."""
    config = hf_config(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    # Seed here, not only globally: the initial weights must not depend on what ran before (e.g. data packing).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def count_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters without allocating them (meta device); tied embeddings counted once."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size, None, 0))
    return sum(p.numel() for p in model.parameters())


def size_config(path: Path) -> ModelConfig:
    """A ``conf/model/*.yaml`` size on its own (no Hydra composition, tokenizer left unset): for listing sizes
    and for benchmarks that build random-init models without a tokenizer (bench/gpu_check.py)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(path)
    raw.tokenizer = "unused"
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def _main() -> None:
    print(f"{'config':<14}{'arch':>7}{'layers':>7}{'hidden':>8}{'vocab 49,152':>15}{'vocab 151,552':>15}")
    for path in sorted(SIZES_DIR.glob("*.yaml")):
        cfg = size_config(path)
        counts = [count_params(cfg, v) / 1e6 for v in (49152, 151552)]
        print(f"{cfg.name:<14}{cfg.arch:>7}{cfg.num_layers:>7}{cfg.hidden_size:>8}"
              f"{counts[0]:>14,.1f}M{counts[1]:>14,.1f}M")


if __name__ == "__main__":
    _main()
