"""Losses, kept outside the model (torchtitan-style): the trainer gets logits and decides what to optimise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: position t predicts token t+1 of the same packed row.

    Computed in fp32 even under bf16 autocast: the logsumexp over a 49k+ vocabulary loses precision in bf16.
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))
