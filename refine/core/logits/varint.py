"""LEB128 varints and per-group gap coding, vectorised: how the compact codec stores sorted runs of integers."""

from __future__ import annotations

import numpy as np

from refine.core.logits.format import CorruptShard


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """How many LEB128 bytes each non-negative integer (< 2^35) takes."""
    v = np.asarray(values)
    return 1 + sum((v >= (1 << (7 * k))).astype(np.int64) for k in range(1, 5))


def varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 bytes of non-negative integers (< 2^35), vectorised."""
    v = values.astype(np.int64)
    nbytes = varint_lengths(v)
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for k in range(5):
        has = nbytes > k
        out[starts[has] + k] = ((v[has] >> (7 * k)) & 127) | ((nbytes[has] > k + 1) << 7)
    return out


def varint_decode(buf: np.ndarray, count: int) -> np.ndarray:
    """Inverse of ``varint_encode`` for exactly ``count`` values filling ``buf``."""
    ends = buf < 128
    if int(ends.sum()) != count or (len(buf) and not ends[-1]):
        raise CorruptShard("a varint stream does not hold the stored number of values")
    group = np.cumsum(ends) - ends                                   # value index of every byte
    first = np.flatnonzero(np.concatenate([[True], ends[:-1]]))      # first byte of every value
    shift = np.arange(len(buf)) - first[group]
    if len(buf) and shift.max() > 4:
        raise CorruptShard("varint longer than 5 bytes")
    # float64 sums are exact below 2^53; values are < 2^35
    return np.bincount(group, weights=(buf & 127) * np.exp2(7.0 * shift), minlength=count).astype(np.int64)


def segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For flat items grouped by ``counts``: each item's group and the index of its group's first item."""
    group = np.repeat(np.arange(len(counts)), counts)
    return group, np.repeat(np.cumsum(counts) - counts, counts)


def cumsum_within(gaps: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Undo per-group gap coding (each group's first value is absolute)."""
    _, first = segments(counts)
    cum = np.cumsum(gaps)
    return cum - (cum[first] - gaps[first])


def gaps_within(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-group gap coding: each value minus the one before it in its group (a group's first value as is)."""
    _, first = segments(counts)
    prev = np.concatenate([[0], values[:-1]])
    return values - np.where(np.arange(len(values)) == first, 0, prev)
