"""The optimizer side of a step: AdamW over two parameter groups, the learning-rate schedule, gradient clipping.

Built from ``cfg.optim`` and ``cfg.schedule`` over the (possibly DDP/FSDP-wrapped) loss module's parameters; the
schedule's shape itself is ``distill.schedules`` (pure functions of the step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distill.schedules import lr_multiplier

if TYPE_CHECKING:
    from distill.config import OptimConfig, ScheduleConfig


def build_optimizer(module: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases): the usual GPT recipe."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_scheduler(opt: torch.optim.Optimizer, max_steps: int,
                    cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, max_steps, cfg))


def clip_gradients(module: torch.nn.Module, max_norm: float) -> float:
    """Clip to ``max_norm`` (0: no clipping, the norm is still measured) and return the global norm before it."""
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm if max_norm > 0 else float("inf"))
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()   # FSDP: a sharded DTensor
