"""The reference LM's size and training budget, from the teacher and D_ref (``ref_split.sizing=auto``).

MiniPLM's reference is the teacher's family and tokenizer scaled down about 17 times in parameters (104M for a
1.8B Qwen teacher) and trained on all of D_ref (5B tokens, one pass). A fixed miniature whatever the corpus makes
``NLL_ref - NLL_teacher`` rank what the reference never had the chance to learn: licence boilerplate the teacher has
seen a thousand times ranks first. So by default the shape comes from the teacher's ``config.json`` (width and depth
scaled together, its head size, GQA ratio and MLP ratio kept) and the budget from D_ref: ``epochs`` passes, at least
``min_train_tokens`` (a small D_ref is repeated, the validation loss stopping it once it overfits), at most
``max_train_tokens``. Batch, warmup, validation and checkpoint intervals follow the number of steps.

``refine`` never imports the trainer: the plan is a list of ``distill.train`` overrides, and parameters are counted
here with the Llama/Qwen2 formula the trainer's models follow (``tests/test_reference_size.py`` checks the two
agree).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from refine.core.errors import InputError

TARGET_STEPS = 2000          # steps a budget is spread over before the batch grows (8 to 512 rows)
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama", "qwen3": "qwen2"}   # teacher -> trainer arch


@dataclass
class Shape:
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    def params(self) -> int:
        """Parameters of a Llama (Qwen2: + q/k/v biases) of this shape, tied embeddings counted once."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        if self.arch == "qwen2":
            layer += q + 2 * kv
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h


@dataclass
class ReferencePlan:
    shape: Shape
    teacher_params: int
    teacher_family: str
    d_ref_tokens: int                      # D_ref's training tokens
    train_tokens: int                      # what the budget trains on (steps x batch x seq_len)
    seq_len: int
    batch_size: int
    max_steps: int
    warmup_steps: int
    eval_every: int
    eval_batches: int
    patience: int
    rope_theta: float

    @property
    def params(self) -> int:
        return self.shape.params()

    def overrides(self) -> list[str]:
        """``distill.train`` overrides after ``+experiment=reference`` (the user's ``ref_split.overrides`` follow)."""
        s = self.shape
        return [f"model.arch={s.arch}", "model.name=reference_auto", f"model.hidden_size={s.hidden}",
                f"model.num_layers={s.layers}", f"model.num_heads={s.heads}", f"model.num_kv_heads={s.kv_heads}",
                f"model.intermediate_size={s.intermediate}", f"model.tie_word_embeddings={str(s.tied).lower()}",
                f"model.rope_theta={self.rope_theta}", f"model.max_position_embeddings={max(self.seq_len, 2048)}",
                f"data.seq_len={self.seq_len}", f"data.batch_size={self.batch_size}", "data.grad_accum=1",
                f"trainer.max_steps={self.max_steps}", f"schedule.warmup_steps={self.warmup_steps}",
                f"trainer.eval_every={self.eval_every}", f"trainer.eval_batches={self.eval_batches}",
                f"trainer.ckpt_every={self.eval_every}", f"trainer.early_stop_patience={self.patience}"]

    def describe(self, seconds: float | None) -> str:
        s = self.shape
        passes = self.train_tokens / max(self.d_ref_tokens, 1)
        eta = f", about {_duration(seconds)} here (matmul probe, +-2x)" if seconds else ""
        return (f"reference LM: {s.arch} {self.params / 1e6:.1f}M parameters ({s.layers} layers x {s.hidden}, "
                f"1/{self.teacher_params / self.params:.0f} of the teacher's {self.teacher_params / 1e6:.0f}M), "
                f"up to {self.train_tokens:,} tokens ({passes:.1f} passes over D_ref's {self.d_ref_tokens:,}; "
                f"{self.max_steps:,} steps of {self.batch_size} x {self.seq_len}, stopping early when its "
                f"validation loss stops improving){eta}")

    def record(self) -> dict:
        return {**asdict(self), "params": self.params}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def teacher_shape(folder: Path, vocab: int) -> tuple[Shape, str, float]:
    """The teacher's shape from its ``config.json`` (text config of a multimodal one), its family and rope theta."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    try:
        h, layers, heads = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{folder}/config.json has no hidden_size / num_hidden_layers / num_attention_heads: "
                         f"ref_split.sizing=auto cannot scale the reference from it; give reference.path= or "
                         f"ref_split.sizing=fixed") from None
    family = str(cfg.get("model_type", "llama"))
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    shape = Shape(FAMILIES.get(family, "llama"), h, layers, heads, int(cfg.get("num_key_value_heads") or heads),
                  int(cfg.get("head_dim") or h // heads), int(cfg.get("intermediate_size") or 4 * h), vocab,
                  bool(cfg.get("tie_word_embeddings", True)))
    return shape, family, float(theta)


def scaled(teacher: Shape, target: float) -> Shape:
    """The shape nearest ``target`` parameters (in log) with the teacher's head size, GQA, MLP and depth/width
    ratios: hidden sizes in steps of one head, depth in proportion (at least 2 layers)."""
    best = None
    for n_heads in range(1, teacher.heads + 1):
        h = n_heads * teacher.head_dim
        kv = max(1, round(n_heads * teacher.kv_heads / teacher.heads))
        while n_heads % kv:
            kv -= 1
        layers = max(2, round(teacher.layers * n_heads / teacher.heads))
        inter = max(64, round(teacher.intermediate * n_heads / teacher.heads / 64) * 64)
        s = Shape(teacher.arch, h, layers, n_heads, kv, teacher.head_dim, inter, teacher.vocab, teacher.tied)
        err = abs(math.log(s.params() / target))
        if best is None or err < best[0]:
            best = (err, s)
    return best[1]


def count_weights(folder: Path) -> int:
    """Parameters stored in a model folder's safetensors files (their headers only)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "np") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def plan(split_cfg, teacher: Path, vocab: int, d_ref: dict, seq_len: int) -> ReferencePlan:
    """The reference for this teacher and D_ref (``d_ref``: ``refine.reference.carve``'s record)."""
    t_shape, family, theta = teacher_shape(teacher, vocab)
    t_params = count_weights(teacher) or t_shape.params()
    shape = scaled(t_shape, t_params * split_cfg.param_ratio)
    d_tokens = int(d_ref["train"]["tokens"])
    tokens = min(max(split_cfg.epochs * d_tokens, split_cfg.min_train_tokens), split_cfg.max_train_tokens)
    batch = min(max(8, 2 ** math.ceil(math.log2(max(tokens / (seq_len * TARGET_STEPS), 1)))), 512)
    steps = max(math.ceil(tokens / (batch * seq_len)), 20)
    every = max(10, steps // 25)
    val_rows = max(int(d_ref["val"]["tokens"]) // seq_len, 1)
    return ReferencePlan(shape, t_params, family, d_tokens, steps * batch * seq_len, seq_len, batch, steps,
                         warmup_steps=min(max(10, steps // 50), 2000, steps // 2), eval_every=every,
                         eval_batches=min(max(math.ceil(val_rows / batch), 1), 16), patience=split_cfg.patience,
                         rope_theta=theta)


def estimate_seconds(p: ReferencePlan, device: str = "auto", probe_s: float = 0.3) -> float | None:
    """Training time from FLOPs (6 per weight per token; the input embedding is a lookup, the head a matmul)
    over the rate a matmul of the reference's own widths reaches on this machine, halved for what a training
    step adds (attention, norms, the optimizer). A ballpark to decide whether to start, not a measurement."""
    import torch

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    s = p.shape
    rows = min(p.batch_size * p.seq_len, 4096)
    a = torch.randn(rows, s.hidden, device=dev)
    w = torch.randn(s.hidden, max(s.intermediate, s.vocab // 8), device=dev)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < probe_s or n < 2:
        (a @ w).sum().item()
        n += 1
    rate = 2 * rows * w.shape[0] * w.shape[1] * n / (time.perf_counter() - t0)
    matmul_weights = p.params - s.vocab * s.hidden * (0 if s.tied else 1)    # the head stays, the lookup goes
    return 6 * matmul_weights * p.train_tokens / (rate * 0.5)
