"""The top-p-k truncation policy: how many of a position's sorted candidates a ``top_p_k`` store keeps.

One rule for the refine pass (``LogitsWriter.write_shard``), re-truncation of a stored store
(``refine.core.logits.tools.retruncate``) and the online teacher (``distill.signal``), so the three agree.
"""

from __future__ import annotations

import numpy as np


def truncate_top_p_k(topk_logprobs: np.ndarray, top_p: float, top_k: int) -> np.ndarray:
    """How many of the (sorted) candidates to keep per position: top-p first, then at most top-k.

    Top-p keeps the smallest prefix whose probability reaches ``top_p`` (the token that crosses it included),
    measured on the full-softmax probabilities; top-k then caps it. At least one token is always kept.
    """
    probs = np.exp(topk_logprobs.astype(np.float64))
    mass_before = np.cumsum(probs, axis=-1) - probs
    n_p = (mass_before < top_p).sum(axis=-1)
    return np.clip(n_p, 1, top_k).astype(np.uint8)
