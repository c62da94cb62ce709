"""D_ref, the held-out part of a corpus MiniPLM trains its reference LM on, chosen by document id.

A document belongs to D_ref when a keyed hash of its id falls below ``fraction``: the choice depends on the id
only (not on order, sharding or which other documents exist), so packing for scoring leaves exactly the documents
out that the reference was trained on. Within D_ref, the lowest ``VAL_SHARE`` of that range is the reference's
validation text. A token budget (``budget_fraction``) lowers ``fraction`` to where the lowest-hash documents reach
it: that threshold depends on the corpus's token counts, but membership below it is still by id alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from refine.core.errors import InputError

VAL_SHARE = 0.1


def _unit(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by ``(seed, doc_id)``."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


@dataclass(frozen=True)
class HoldOut:
    fraction: float
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise InputError(f"the reference split's fraction must be in (0, 1), got {self.fraction}")

    def unit(self, doc_id: str) -> float:
        """Where ``doc_id`` falls in [0, 1): below ``fraction`` is D_ref."""
        return _unit(doc_id, self.seed)

    def holds(self, doc_id: str) -> bool:
        """Whether ``doc_id`` is in D_ref (and so never scored)."""
        return self.unit(doc_id) < self.fraction

    def is_val(self, doc_id: str) -> bool:
        """Whether ``doc_id`` is in D_ref's validation part (a subset of ``holds``)."""
        return self.unit(doc_id) < self.val_below

    @property
    def val_below(self) -> float:
        return self.fraction * VAL_SHARE

    def key(self) -> dict:
        return {"fraction": self.fraction, "seed": self.seed}


def budget_fraction(units: np.ndarray, tokens: np.ndarray, fraction: float, max_tokens: int) -> float:
    """The threshold ``t <= fraction`` that keeps D_ref within ``max_tokens`` (0: no budget): the unit of the
    first document, in unit order, whose tokens would pass the budget, so that the documents below ``t`` are the
    lowest-unit ones and total at most ``max_tokens``. ``units``/``tokens``: every document below ``fraction``."""
    if not max_tokens or int(tokens.sum()) <= max_tokens:
        return fraction
    order = np.argsort(units, kind="stable")
    first_out = int(np.searchsorted(np.cumsum(tokens[order]), max_tokens, side="right"))
    return float(units[order[first_out]])    # documents at exactly this unit (the same id twice) are out too
