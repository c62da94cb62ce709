"""The compact ("zstd") encoding of one logits-store shard: pure encode/decode functions.

``refine.core.logits_store`` owns the store format and is the only caller. A shard is self-contained (no table
shared with other shards: shards may be written on different machines), and one instance decodes alone.

Values. ``v = exp(logprob) / scale`` (``scale``: the shard's largest ``v``, at least 1, because RS-KD importance
weights can exceed 1 at a sampling temperature != 1) is stored as a *level* ``clip(round(sqrt(v) * L), 1, L)``.
Uniform steps in ``sqrt(p)`` make every kept token's share of KL(teacher || stored) about ``1 / (6 L^2)`` nats
whatever its p (a log-p grid spends its bits on the head); a kept id never falls to level 0. A level decodes to
the mean ``v`` of that level in the shard (its centroid, stored per shard). The floor: every kept ``v`` below
``(1.5 / L)^2`` (about 1e-3 at 48 levels and scale 1) lands in level 1 and decodes to that level's mean, so the
codec cannot tell kept probabilities below ~1e-3 apart. The centroids keep the kept mass unbiased per shard, not
per position. The missing-mass ``tail`` policy needs each position's missing mass ``1 - sum p`` to a few parts
in 1e4, so each position's kept mass is stored as ``log(sum p)`` in float16 (relative error below 1e-3 for the
kept and the missing mass alike, whether the kept mass is near 0 or near 1; RS-KD weights may sum above 1), and
each position's decoded values are scaled to sum to it.

Ids. A position's ids are a set out of the vocabulary whose make-up depends on the kind of context (after a
full stop, inside a word, ...). The writer clusters the shard's positions by their id sets (hard EM on a
mixture of independent Bernoullis) and stores, per cluster, every id seen in it, ordered by frequency class
(``floor(log2(count))``, most frequent first) and by id within a class (so a table is cheap: sorted gaps).
An id's *rank* is its index in its position's cluster table; each position's ranks are sorted and stored
as gaps (LEB128 varints), its levels in the same order. What the clusters save, and the codec's bytes per
token and KL against the raw store, are measured by ``bench/logits_store_bench.py`` (bench/README.md).

Layout (little-endian)::

    b"RDL2" | u32 index length | index: one zstd frame of
        u32 [n, positions, vocab, clusters, levels] | f64 scale | f32 centroids [levels + 1]
        | u32 table sizes [clusters, 32 classes] | u32 frame sizes [n, 5] | varint table gaps
    | per instance five zstd frames: u8 cluster [positions] | u8 count [positions] | varint gaps | u8 levels
                                   | f16 log kept mass [positions]

Shards of the first version (``b"RDLZ"``: four frames, no kept mass) still decode, without the per-position
mass correction; ``refine.core.logits_store`` refuses the ``tail`` policy on them.

Separate frames, not one frame with several blocks: each stream gets its own entropy tables (smaller). Every
frame carries zstd's checksum and its sizes are in the checksummed index, so a flipped or missing byte is an
error on read, never wrong values. Decoding is numpy over whole arrays.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import zstandard

MAGIC, MAGIC_V1 = b"RDL2", b"RDLZ"
MAX_COUNT = 255      # counts are uint8, like the raw layout's
CLASSES = 32         # frequency classes floor(log2(count)) of a table entry (counts < 2^32)
STREAMS = 5          # cluster, count, gaps, levels, log kept mass (version 1: the first four)
MAX_CLUSTERS = 255   # cluster numbers are uint8
MAX_LEVELS = 255     # levels are uint8
MAX_SCALE = 2.0 ** 40  # RS-KD importance weights above 1 are real; 1e12 is not (log-probs up to +27.7 nats)
MIN_FRAME = 9        # the smallest zstd frame with a checksum: magic 4, header 2, block header 3 (+ checksum 4)
MAX_WINDOW = 1 << 27  # zstd's own default limit, stated: no frame of a shard needs a larger window


class CorruptShard(ValueError):
    """The bytes are not a valid compact shard (truncated, flipped, or not this codec)."""


@dataclass(frozen=True)
class CodecParams:
    clusters: int = 16     # 16 vs 32: better on one shard, worse on another; 1.2 s of EM per 128 instances
    levels: int = 48       # KL(raw || compact) 0.003 nats/token, ~15 B/position of levels on this store
    zstd_level: int = 15   # as small as 19 here and faster to write; decoding speed does not depend on it
    em_iterations: int = 10


def _varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128 bytes of non-negative integers (< 2^35), vectorised."""
    v = values.astype(np.int64)
    nbytes = 1 + sum((v >= (1 << (7 * k))).astype(np.int64) for k in range(1, 5))
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for k in range(5):
        has = nbytes > k
        out[starts[has] + k] = ((v[has] >> (7 * k)) & 127) | ((nbytes[has] > k + 1) << 7)
    return out


def _varint_decode(buf: np.ndarray, count: int) -> np.ndarray:
    """Inverse of ``_varint_encode`` for exactly ``count`` values filling ``buf``."""
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


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For flat items grouped by ``counts``: each item's group and the index of its group's first item."""
    group = np.repeat(np.arange(len(counts)), counts)
    return group, np.repeat(np.cumsum(counts) - counts, counts)


def _cumsum_within(gaps: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Undo per-group gap coding (each group's first value is absolute)."""
    _, first = _segments(counts)
    cum = np.cumsum(gaps)
    return cum - (cum[first] - gaps[first])


def _gaps_within(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    _, first = _segments(counts)
    prev = np.concatenate([[0], values[:-1]])
    return values - np.where(np.arange(len(values)) == first, 0, prev)


def _cluster(pos: np.ndarray, ids: np.ndarray, n_pos: int, vocab: int, k: int, iterations: int) -> np.ndarray:
    """Hard-EM clusters of positions by their id sets (a mixture of independent Bernoullis per id)."""
    if k == 1 or n_pos == 0:
        return np.zeros(n_pos, dtype=np.int64)
    prior = (np.bincount(ids, minlength=vocab) + 0.5) / (n_pos + 1.0)     # shrink each cluster towards this
    z = np.random.default_rng(0).integers(0, k, n_pos)                      # seeded: reruns write the same bytes
    # positions x ids as a sparse 0/1 matrix: a position's log-likelihood under every cluster is one sparse
    # matmul (C, no per-cluster pass over the pairs)
    member = scipy.sparse.csr_matrix((np.ones(len(ids)), (pos, ids)), shape=(n_pos, vocab))
    for _ in range(iterations):
        hits = np.bincount(z[pos] * vocab + ids, minlength=k * vocab).reshape(k, vocab)
        pi = (hits + prior) / (np.bincount(z, minlength=k)[:, None] + 1.0)
        log_in, log_out = np.log(pi), np.log1p(-pi)
        ll = member @ (log_in - log_out).T + log_out.sum(1)
        z_new = ll.argmax(1)
        if np.array_equal(z_new, z):
            break
        z = z_new
    return z


def encode_shard(counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, vocab_size: int,
                 params: CodecParams = CodecParams()) -> bytes:
    """``counts`` [n, positions] and the flat pairs (any order within a position) -> the shard's bytes."""
    n, t = counts.shape
    flat = counts.reshape(-1).astype(np.int64)
    if flat.max(initial=0) > MAX_COUNT:
        raise ValueError(f"at most {MAX_COUNT} pairs per position")
    ids = ids.astype(np.int64)
    pos, _ = _segments(flat)

    v = np.exp(logprobs.astype(np.float64))
    with np.errstate(divide="ignore"):                       # a position with no pairs keeps log 0 = -inf
        log_kept = np.log(np.bincount(pos, weights=v, minlength=len(flat))).astype("<f2")
    scale = max(1.0, float(v.max(initial=0.0)))
    v /= scale
    levels = np.clip(np.rint(np.sqrt(v) * params.levels), 1, params.levels).astype(np.int64)
    used = np.bincount(levels, minlength=params.levels + 1)
    centroids = np.where(used > 0, np.bincount(levels, weights=v, minlength=params.levels + 1) / np.maximum(used, 1),
                         (np.arange(params.levels + 1) / params.levels) ** 2)      # unused levels: the midpoint

    k = params.clusters
    z = _cluster(pos, ids, len(flat), vocab_size, k, params.em_iterations)
    hits = np.bincount(z[pos] * vocab_size + ids, minlength=k * vocab_size).reshape(k, vocab_size)
    cls = np.where(hits > 0, np.floor(np.log2(np.maximum(hits, 1))).astype(np.int64), -1)
    rank_of = np.zeros((k, vocab_size), dtype=np.int64)
    tables, sizes = [], np.zeros((k, CLASSES), dtype=np.int64)
    for c in range(k):
        seen = np.flatnonzero(hits[c])
        table = seen[np.argsort(-cls[c, seen], kind="stable")]          # by class, by id within a class
        rank_of[c, table] = np.arange(len(table))
        sizes[c] = np.bincount(CLASSES - 1 - cls[c, seen], minlength=CLASSES)
        tables.append(table)

    ranks = rank_of[z[pos], ids]
    order = np.lexsort((ranks, pos))
    gaps = _gaps_within(ranks[order], flat)
    levels = levels[order]

    cctx = zstandard.ZstdCompressor(level=params.zstd_level, write_checksum=True)
    frames, frame_sizes, start = [], np.zeros((n, STREAMS), dtype=np.int64), 0
    for i in range(n):
        stop = start + int(counts[i].sum())
        streams = (z[i * t:(i + 1) * t].astype(np.uint8), counts[i].astype(np.uint8),
                   _varint_encode(gaps[start:stop]), levels[start:stop].astype(np.uint8), log_kept[i * t:(i + 1) * t])
        for s, stream in enumerate(streams):
            frames.append(cctx.compress(stream.tobytes()))
            frame_sizes[i, s] = len(frames[-1])
        start = stop
    table_ids = np.concatenate(tables) if tables else np.zeros(0, dtype=np.int64)
    index = b"".join([
        np.array([n, t, vocab_size, k, params.levels], dtype="<u4").tobytes(), struct.pack("<d", scale),
        centroids.astype("<f4").tobytes(), sizes.astype("<u4").tobytes(), frame_sizes.astype("<u4").tobytes(),
        _varint_encode(_gaps_within(table_ids, sizes.reshape(-1))).tobytes()])
    index = cctx.compress(index)
    return b"".join([MAGIC, struct.pack("<I", len(index)), index, *frames])


class ShardDecoder:
    """Reads instances of one compact shard from its bytes (e.g. a memory map); errors are ``CorruptShard``.

    Nothing is allocated from a size the file declares before that size is checked against what the index
    implies (the sha256 in ``store.json`` does not protect this: whoever edits a shard can edit it too): every
    frame is decompressed with a ceiling, a frame whose declared content size is above it is refused unread,
    and the scale, centroids, clusters, levels and table sizes are range-checked, so a crafted shard is a
    ``CorruptShard`` line, never a memory blow-up or a NaN/huge log-prob."""

    def __init__(self, buf, n: int, positions: int, vocab_size: int):
        self.buf = memoryview(buf)
        self._dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        if len(self.buf) < 8 or bytes(self.buf[:4]) not in (MAGIC, MAGIC_V1):
            raise CorruptShard("not a compact logits shard (bad magic)")
        self.has_mass = bytes(self.buf[:4]) == MAGIC
        streams = STREAMS if self.has_mass else STREAMS - 1
        (index_len,) = struct.unpack("<I", self.buf[4:8])
        if 8 + index_len > len(self.buf) or n * streams * MIN_FRAME > len(self.buf) - 8 - index_len:
            raise CorruptShard(f"index length {index_len} or {n} instances do not fit the file's {len(self.buf)} bytes")
        # largest index: header, centroids, table sizes, frame sizes, and a 5-byte varint per table entry of
        # each cluster; the cluster count is streamed out of the frame's first bytes to size that bound
        try:
            head = self._dctx.stream_reader(self.buf[8:8 + index_len]).read(28)
        except zstandard.ZstdError as e:
            raise CorruptShard(f"bad zstd frame (index): {e}") from None
        k = min(int(np.frombuffer(head[12:16], dtype="<u4")[0]) if len(head) >= 16 else 0, MAX_CLUSTERS)
        index_max = 28 + 4 * (MAX_LEVELS + 1) + 4 * k * CLASSES + 4 * n * streams + 5 * k * vocab_size
        index = self._decompress(self.buf[8:8 + index_len], index_max, "index")
        if len(index) < 28 or tuple(np.frombuffer(index[:12], dtype="<u4")) != (n, positions, vocab_size):
            raise CorruptShard(f"index does not describe {n} instances x {positions} positions, vocab {vocab_size}")
        k, levels = (int(x) for x in np.frombuffer(index[12:20], dtype="<u4"))
        (self.scale,) = struct.unpack("<d", index[20:28])
        if not (1 <= k <= MAX_CLUSTERS and 1 <= levels <= MAX_LEVELS):
            raise CorruptShard(f"index has {k} clusters and {levels} levels (1..{MAX_CLUSTERS}, 1..{MAX_LEVELS})")
        if not 1.0 <= self.scale <= MAX_SCALE:          # also false for NaN
            raise CorruptShard(f"scale {self.scale!r} outside [1, {MAX_SCALE:.0e}]")
        at, parts = 28, []
        for count, dt in (((levels + 1), "<f4"), (k * CLASSES, "<u4"), (n * streams, "<u4")):
            if len(index) < at + 4 * count:
                raise CorruptShard("index too short")
            parts.append(np.frombuffer(index[at:at + 4 * count], dtype=dt))
            at += 4 * count
        self.centroids = parts[0].astype(np.float64)
        # v / scale is in [0, 1], so is a level's mean (f32 rounding aside); 0 decodes to -inf, a real zero
        if not (np.isfinite(self.centroids).all() and self.centroids.min() >= 0 and self.centroids.max() <= 1 + 1e-6):
            raise CorruptShard("centroids not finite or outside [0, 1]")
        sizes = parts[1].astype(np.int64)
        self.table_len = sizes.reshape(k, CLASSES).sum(1)
        if (self.table_len > vocab_size).any():
            raise CorruptShard(f"an id table longer than the vocabulary ({vocab_size})")
        table_ids = _cumsum_within(_varint_decode(np.frombuffer(index[at:], dtype=np.uint8), int(sizes.sum())), sizes)
        if (table_ids >= vocab_size).any():
            raise CorruptShard("id table out of range")
        self.tables, self.table_start = table_ids, np.cumsum(self.table_len) - self.table_len
        ends = 8 + index_len + np.cumsum(parts[2].astype(np.int64))
        if (ends[-1] if n else 8 + index_len) != len(self.buf):
            raise CorruptShard("frame sizes do not add up to the file size")
        self.frame_ends = ends.reshape(n, streams)
        self.frame_start = np.concatenate([[8 + index_len], ends[:-1]]).reshape(n, streams)
        self.clusters, self.levels, self.positions = k, levels, positions

    def _decompress(self, frame, limit: int, what: str) -> bytes:
        """One zstd frame of at most ``limit`` bytes of content: a larger declared size is refused before any
        allocation, an undeclared one is cut off at ``limit``."""
        declared = -1
        try:
            declared = zstandard.frame_content_size(frame)
            if declared > limit:
                raise CorruptShard(f"zstd frame ({what}) declares {declared} bytes, at most {limit} expected")
            out = self._dctx.decompress(frame, max_output_size=max(limit, 1) if declared < 0 else 0)
        except zstandard.ZstdError as e:
            cap = f", no declared size, at most {limit} bytes expected" if declared < 0 else ""
            raise CorruptShard(f"bad zstd frame ({what}{cap}): {e}") from None
        if len(out) > limit:
            raise CorruptShard(f"zstd frame ({what}) holds {len(out)} bytes, at most {limit} expected")
        return out

    def decode(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Instance ``j``: (counts uint8 [positions], ids int64, logprobs float32), most likely first."""
        t = self.positions
        span = lambda s: self.buf[self.frame_start[j, s]:self.frame_ends[j, s]]    # noqa: E731
        counts = np.frombuffer(self._decompress(span(1), t, f"instance {j} counts"), dtype=np.uint8)
        pairs = int(counts.sum(dtype=np.int64))
        z = np.frombuffer(self._decompress(span(0), t, f"instance {j} clusters"), dtype=np.uint8)
        gaps = np.frombuffer(self._decompress(span(2), 5 * pairs, f"instance {j} ranks"), dtype=np.uint8)
        levels = np.frombuffer(self._decompress(span(3), pairs, f"instance {j} levels"), dtype=np.uint8)
        kept_bytes = self._decompress(span(4), 2 * t, f"instance {j} kept mass") if self.has_mass else None
        if len(z) != t or len(counts) != t or len(levels) != pairs or z.max(initial=0) >= self.clusters:
            raise CorruptShard(f"instance {j} has inconsistent streams")
        z = z.astype(np.int64)
        if pairs and (levels.min() < 1 or levels.max() > self.levels):
            raise CorruptShard(f"instance {j} has levels out of range")
        counts64 = counts.astype(np.int64)
        ranks = _cumsum_within(_varint_decode(gaps, pairs), counts64)
        pos = _segments(counts64)[0]
        cluster = z[pos]
        if pairs and (ranks >= self.table_len[cluster]).any():
            raise CorruptShard(f"instance {j} has ranks out of range")
        ids = self.tables[self.table_start[cluster] + ranks]
        levels = levels.astype(np.int64)
        # most likely first, ties by id: one int64 key (position | 255 - level | id) sorts faster than lexsort
        order = np.argsort((pos << 40) | ((255 - levels) << 32) | ids)
        v = self.centroids[levels[order]] * self.scale
        if kept_bytes is not None:
            if len(kept_bytes) != 2 * t:
                raise CorruptShard(f"instance {j} has inconsistent streams")
            kept = np.frombuffer(kept_bytes, dtype="<f2").astype(np.float64)
            if not np.isfinite(kept[counts64 > 0]).all() or (kept > np.log(MAX_COUNT * self.scale) + 1e-2).any():
                raise CorruptShard(f"instance {j} has kept masses out of range")
            decoded = np.bincount(pos, weights=v, minlength=t)
            v = v * (np.exp(kept) / np.where(decoded > 0, decoded, 1))[pos]    # each position's mass, as stored
        return counts.copy(), ids[order], np.log(v).astype(np.float32)
