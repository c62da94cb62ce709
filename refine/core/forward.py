"""The one forward rule for causal LMs, shared by scoring, training, validation and evaluation.

Every pass that turns token rows into next-token predictions goes through ``forward_logits``, so a model is
scored exactly as it is trained (same BOS rule, same positions).
"""

from __future__ import annotations

import torch


def forward_logits(model, batch: torch.Tensor, bos_id: int | None, hidden: bool = False) -> torch.Tensor:
    """Next-token logits [B, L, V] of ``batch``'s positions (``hidden``: the final hidden states [B, L, D] the
    LM head would multiply); with ``bos_id`` the model sees BOS first and the BOS position's output is dropped,
    so position t still predicts token t+1 of the row."""
    if bos_id is not None:
        bos = torch.full((batch.shape[0], 1), bos_id, dtype=batch.dtype, device=batch.device)
        batch = torch.cat([bos, batch], dim=1)
    out = model.base_model(input_ids=batch).last_hidden_state if hidden else model(input_ids=batch).logits
    return out if bos_id is None else out[:, 1:]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
