"""The compact ("zstd") codec's decoder: one instance of a shard at a time (layout: ``refine.core.logits.format``).

Everything it reads is bounded before it is used, because ``store.json``'s sha256 does not protect a shard
(whoever edits one can edit both): errors are ``CorruptShard``, never a memory blow-up or a NaN. Decoding is
numpy over whole arrays.
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from refine.core.logits.format import CLASSES, MAGIC, MAGIC_V1, MAX_K, STREAMS, CorruptShard
from refine.core.logits.varint import cumsum_within, segments, varint_decode

MAX_CLUSTERS = 255   # cluster numbers are uint8
MAX_LEVELS = 255     # levels are uint8
MAX_SCALE = 2.0 ** 40  # RS-KD importance weights above 1 are real; 1e12 is not (log-probs up to +27.7 nats)
MIN_FRAME = 9        # the smallest zstd frame with a checksum: magic 4, header 2, block header 3 (+ checksum 4)
MAX_WINDOW = 1 << 27  # zstd's own default limit, stated: no frame of a shard needs a larger window


class ShardDecoder:
    """Reads instances of one compact shard from its bytes (e.g. a memory map); errors are ``CorruptShard``.

    Nothing is allocated from a size the file declares before that size is checked against what the index
    implies: every frame is decompressed with a ceiling, a frame whose declared content size is above it is
    refused unread, and the scale, centroids, clusters, levels and table sizes are range-checked, so a crafted
    shard is a ``CorruptShard`` line, never a memory blow-up or a NaN/huge log-prob."""

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
        index = self._read_index(index_len, n, streams, vocab_size)
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
        table_ids = cumsum_within(varint_decode(np.frombuffer(index[at:], dtype=np.uint8), int(sizes.sum())), sizes)
        if (table_ids >= vocab_size).any():
            raise CorruptShard("id table out of range")
        self.tables, self.table_start = table_ids, np.cumsum(self.table_len) - self.table_len
        ends = 8 + index_len + np.cumsum(parts[2].astype(np.int64))
        if (ends[-1] if n else 8 + index_len) != len(self.buf):
            raise CorruptShard("frame sizes do not add up to the file size")
        self.frame_ends = ends.reshape(n, streams)
        self.frame_start = np.concatenate([[8 + index_len], ends[:-1]]).reshape(n, streams)
        self.clusters, self.levels, self.positions = k, levels, positions

    def _read_index(self, index_len: int, n: int, streams: int, vocab_size: int) -> bytes:
        """The index frame, decompressed up to the largest index: header, centroids, table sizes, frame sizes,
        and a 5-byte varint per table entry of each cluster; the cluster count is streamed out of the frame's
        first bytes to size that bound."""
        try:
            head = self._dctx.stream_reader(self.buf[8:8 + index_len]).read(28)
        except zstandard.ZstdError as e:
            raise CorruptShard(f"bad zstd frame (index): {e}") from None
        k = min(int(np.frombuffer(head[12:16], dtype="<u4")[0]) if len(head) >= 16 else 0, MAX_CLUSTERS)
        index_max = 28 + 4 * (MAX_LEVELS + 1) + 4 * k * CLASSES + 4 * n * streams + 5 * k * vocab_size
        return self._decompress(self.buf[8:8 + index_len], index_max, "index")

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
        ranks = cumsum_within(varint_decode(gaps, pairs), counts64)
        pos = segments(counts64)[0]
        cluster = z[pos]
        if pairs and (ranks >= self.table_len[cluster]).any():
            raise CorruptShard(f"instance {j} has ranks out of range")
        ids = self.tables[self.table_start[cluster] + ranks]
        levels = levels.astype(np.int64)
        # most likely first, ties by id: one int64 key (position | 255 - level | id) sorts faster than lexsort
        order = np.argsort((pos << 40) | ((255 - levels) << 32) | ids)
        v = self.centroids[levels[order]] * self.scale
        if kept_bytes is not None:
            v = self._scale_to_kept_mass(j, v, pos, counts64, kept_bytes)
        return counts.copy(), ids[order], np.log(v).astype(np.float32)

    def _scale_to_kept_mass(self, j: int, v: np.ndarray, pos: np.ndarray, counts64: np.ndarray,
                            kept_bytes: bytes) -> np.ndarray:
        """Each position's decoded values scaled to sum to its stored kept mass (format v3)."""
        t = self.positions
        if len(kept_bytes) != 2 * t:
            raise CorruptShard(f"instance {j} has inconsistent streams")
        kept = np.frombuffer(kept_bytes, dtype="<f2").astype(np.float64)
        if not np.isfinite(kept[counts64 > 0]).all() or (kept > np.log(MAX_K * self.scale) + 1e-2).any():
            raise CorruptShard(f"instance {j} has kept masses out of range")
        decoded = np.bincount(pos, weights=v, minlength=t)
        return v * (np.exp(kept) / np.where(decoded > 0, decoded, 1))[pos]    # each position's mass, as stored
