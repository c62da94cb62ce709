"""What a scorer is and returns. No backend is imported here (``refine.scorers.registry`` picks one).

A scorer runs a causal LM over packed rows ``x_0 .. x_{L-1}`` and returns, for every position
``t = 1 .. L-1`` (the first token has no context, so no score):

* ``token_logprobs[b, t-1] = log p(x_t | x_<t)``: the actual token's log-prob, hence the instance NLL that
  difference sampling needs;
* ``topk_ids / topk_logprobs[b, t-1, :]``: the K most likely next tokens at that position with their
  full-softmax log-probs (not renormalised), sorted by descending probability: the raw material of the top-p-k
  truncated teacher logits for distillation. ``None`` when K = 0 (the reference model needs no top-K).

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from refine.core.errors import InputError


@dataclass
class Scores:
    token_logprobs: np.ndarray              # [B, L-1] float32
    topk_ids: np.ndarray | None = None      # [B, L-1, K] int32, most likely first
    topk_logprobs: np.ndarray | None = None  # [B, L-1, K] float32

    def __len__(self) -> int:
        return self.token_logprobs.shape[0]

    def mean_nll(self) -> np.ndarray:
        """Per-row mean negative log-likelihood over its L-1 scored tokens, [B] float64."""
        return -self.token_logprobs.astype(np.float64).mean(axis=1)


def check_rows(rows: np.ndarray, max_model_len: int, bos_id: int | None, engine: str) -> np.ndarray:
    """``rows`` as [B, L >= 2] int64 token ids that fit an engine of ``max_model_len`` (the row, a BOS prefix
    and the one token vLLM must generate), else one clear error."""
    rows = np.asarray(rows).astype(np.int64)
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise InputError(f"rows must be [B, L >= 2] token ids, got shape {rows.shape}")
    need = rows.shape[1] + 1 + (bos_id is not None)
    if need > max_model_len:
        raise InputError(f"rows of {rows.shape[1]} tokens need max_model_len >= {need} ({engine} was started "
                         f"with {max_model_len})")
    return rows


class Scorer(Protocol):
    top_k: int

    def score(self, rows: np.ndarray) -> Scores:
        """Score a [B, L] array of token ids."""

    def close(self) -> None:
        """Release the engine (vLLM needs an explicit shutdown)."""
