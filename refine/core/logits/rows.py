"""One instance's stored pairs (``SparseRows``) and a batch of them as padded arrays for training."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseRows:
    """The kept pairs of one instance: ``ids``/``logprobs`` flat, ``counts`` per position."""
    counts: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray

    def kept_mass(self) -> np.ndarray:
        """Per-position probability mass of the kept ids (1 - the mass the truncation dropped)."""
        pos = np.repeat(np.arange(len(self.counts)), self.counts)
        # bincount, not reduceat: a position with no pairs (all RS-KD draws in the tail) must give 0
        return np.bincount(pos, weights=np.exp(self.logprobs.astype(np.float64)), minlength=len(self.counts))

    def dense(self, vocab_size: int, temperature: float = 1.0) -> np.ndarray:
        """[positions, vocab] renormalised target ``softmax(logprobs / tau)`` over kept ids, zero elsewhere."""
        out = np.zeros((len(self.counts), vocab_size), dtype=np.float64)
        pos = np.repeat(np.arange(len(self.counts)), self.counts)
        z = self.logprobs.astype(np.float64) / temperature
        zmax = np.full(len(self.counts), -np.inf)
        np.maximum.at(zmax, pos, z)
        e = np.exp(z - zmax[pos])
        out[pos, self.ids] = e / np.bincount(pos, weights=e, minlength=len(self.counts))[pos]
        return out


def pad(sparse: list[SparseRows], positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances as [B, positions, K] arrays (ids, logprobs, mask), K the largest count among them, most likely
    first, padded with id 0 / -inf / False; one scatter per instance, no Python per position."""
    b, t = len(sparse), positions
    k = max(max(int(s.counts.max()) for s in sparse), 1)
    ids = np.zeros((b, t, k), dtype=np.int64)
    lps = np.full((b, t, k), -np.inf, dtype=np.float32)
    mask = np.zeros((b, t, k), dtype=bool)
    for i, s in enumerate(sparse):
        counts = s.counts.astype(np.int64)
        pos = np.repeat(np.arange(t), counts)
        slot = np.arange(len(pos)) - np.repeat(np.cumsum(counts) - counts, counts)   # rank within position
        ids[i, pos, slot], lps[i, pos, slot], mask[i, pos, slot] = s.ids, s.logprobs.astype(np.float32), True
    return ids, lps, mask
