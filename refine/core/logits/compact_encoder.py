"""The compact ("zstd") codec's encoder: one shard's pairs -> bytes (layout: ``refine.core.logits.format``).

Values: ``sqrt(p)`` in uniform levels, because that makes every kept token's share of KL(teacher || stored)
about ``1 / (6 L^2)`` nats whatever its p (a log-p grid spends its bits on the head); a kept id never falls to
level 0. A level decodes to the mean of its values in the shard (stored per shard), so kept probabilities
below ``(1.5 / L)^2`` (about 1e-3 at 48 levels) all decode alike. Each position's kept mass is stored too
(``log(sum p)``, float16), because the ``tail`` missing-mass policy needs it per position, not just unbiased
per shard. Its rounding, measured on random masses: the kept mass is off by at most ``2^-11 |log kept|``
relative; the missing mass by at most 3e-8 absolute once it is below 6e-5 (half float16's subnormal step),
which is a relative error of 1.4e-3 (median; 4.9e-3 at most) at a missing mass of 1e-5 and 1.5e-2 (4.8e-2) at
1e-6; above 6e-5 it is at most 4.9e-4 relative. The float32 log-probs the decoder returns add about 1e-7
absolute on a position's sum (32 pairs).

Ids: a position's id set depends on the kind of context (after a full stop, inside a word, ...), so the shard's
positions are clustered by their id sets (hard EM on a mixture of independent Bernoullis) and an id is stored
as its small rank in its cluster's table. What the clusters save, and the codec's bytes and KL against the
raw store, are measured by ``bench/logits_store_bench.py`` (bench/README.md).

Separate zstd frames per stream, not one frame with several blocks: each stream gets its own entropy tables.
Deterministic: the same pairs give the same bytes (the EM is seeded).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import zstandard

from refine.core.logits.format import CLASSES, MAGIC, MAX_K, STREAMS
from refine.core.logits.varint import gaps_within, segments, varint_encode, varint_lengths


@dataclass(frozen=True)
class CodecParams:
    clusters: int = 16     # 32 is better on some shards, worse on others
    levels: int = 48       # its KL and bytes against raw: bench/README.md
    zstd_level: int = 15   # higher levels write more slowly for no smaller shards; decoding speed does not depend on it
    em_iterations: int = 10


def _cluster(pos: np.ndarray, ids: np.ndarray, n_pos: int, vocab: int, k: int, iterations: int) -> np.ndarray:
    """Hard-EM clusters of positions by their id sets (a mixture of independent Bernoullis per id).

    Only the ids the shard holds get a column: every other id has no hits in any cluster, so its probability,
    and the log of it, is one value per cluster, computed once and broadcast (the same float operations on
    the same inputs as over the full vocabulary, so the same bits: a test checks). Saves the logs over
    ``clusters x vocab`` entries per iteration, most of the EM's time at a large vocabulary."""
    if k == 1 or n_pos == 0:
        return np.zeros(n_pos, dtype=np.int64)
    freq = np.bincount(ids, minlength=vocab)
    seen = np.flatnonzero(freq)
    n_seen, col = len(seen), (np.cumsum(freq > 0) - 1)[ids]           # each pair's column: its id's rank in seen
    # shrink each cluster towards the shard's id frequencies (0 for an unseen id)
    prior = (freq[seen] + 0.5) / (n_pos + 1.0)
    prior_unseen = (np.zeros(1, dtype=np.int64) + 0.5) / (n_pos + 1.0)
    z = np.random.default_rng(0).integers(0, k, n_pos)                      # seeded: reruns write the same bytes
    # imported here: only writing a store needs scipy, so the trainer's import chain (the store reader,
    # distill.signal) runs without it, as on bench/gpu_check.py's GPU machines
    import scipy.sparse

    # positions x ids as a sparse 0/1 matrix: a position's log-likelihood under every cluster is one sparse
    # matmul (C, no per-cluster pass over the pairs); columns in id order, as over the full vocabulary
    member = scipy.sparse.csr_matrix((np.ones(len(col)), (pos, col)), shape=(n_pos, n_seen))
    log_out_full = np.empty((k, vocab))
    for _ in range(iterations):
        hits = np.bincount(z[pos] * n_seen + col, minlength=k * n_seen).reshape(k, n_seen)
        denom = np.bincount(z, minlength=k)[:, None] + 1.0
        pi, pi_unseen = (hits + prior) / denom, (np.zeros((k, 1), dtype=np.int64) + prior_unseen) / denom
        log_in, log_out = np.log(pi), np.log1p(-pi)
        log_out_full[:] = np.log1p(-pi_unseen)
        log_out_full[:, seen] = log_out
        ll = member @ (log_in - log_out).T + log_out_full.sum(1)
        z_new = ll.argmax(1)
        if np.array_equal(z_new, z):
            break
        z = z_new
    return z


def _quantise(v: np.ndarray, n_levels: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Probabilities (or RS-KD weights) -> (scale, level of each, each level's mean ``v / scale``)."""
    scale = max(1.0, float(v.max(initial=0.0)))        # importance weights can exceed 1 at a temperature != 1
    v = v / scale
    levels = np.clip(np.rint(np.sqrt(v) * n_levels), 1, n_levels).astype(np.int64)
    used = np.bincount(levels, minlength=n_levels + 1)
    centroids = np.where(used > 0, np.bincount(levels, weights=v, minlength=n_levels + 1) / np.maximum(used, 1),
                         (np.arange(n_levels + 1) / n_levels) ** 2)      # unused levels: the midpoint
    return scale, levels, centroids


def _id_tables(z_of_pair: np.ndarray, ids: np.ndarray, vocab: int, k: int) -> tuple[np.ndarray, list, np.ndarray]:
    """Per cluster, every id seen in it by frequency class (most frequent first), by id within a class:
    (rank of each id in each cluster's table [k, vocab], the tables, their sizes per class [k, CLASSES])."""
    hits = np.bincount(z_of_pair * vocab + ids, minlength=k * vocab).reshape(k, vocab)
    cls = np.where(hits > 0, np.floor(np.log2(np.maximum(hits, 1))).astype(np.int64), -1)
    rank_of = np.zeros((k, vocab), dtype=np.int64)
    tables, sizes = [], np.zeros((k, CLASSES), dtype=np.int64)
    for c in range(k):
        seen = np.flatnonzero(hits[c])
        table = seen[np.argsort(-cls[c, seen], kind="stable")]          # by class, by id within a class
        rank_of[c, table] = np.arange(len(table))
        sizes[c] = np.bincount(CLASSES - 1 - cls[c, seen], minlength=CLASSES)
        tables.append(table)
    return rank_of, tables, sizes


def encode_shard(counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, vocab_size: int,
                 params: CodecParams = CodecParams(), threads: int = 1) -> bytes:
    """``counts`` [n, positions] and the flat pairs (any order within a position) -> the shard's bytes.
    ``threads``: zstd frames compressed by that many threads (the same bytes whatever the number)."""
    n, t = counts.shape
    flat = counts.reshape(-1).astype(np.int64)
    if flat.max(initial=0) > MAX_K:
        raise ValueError(f"at most {MAX_K} pairs per position")
    ids = ids.astype(np.int64)
    pos, _ = segments(flat)

    v = np.exp(logprobs.astype(np.float64))
    with np.errstate(divide="ignore"):                       # a position with no pairs keeps log 0 = -inf
        log_kept = np.log(np.bincount(pos, weights=v, minlength=len(flat))).astype("<f2")
    scale, levels, centroids = _quantise(v, params.levels)

    k = params.clusters
    z = _cluster(pos, ids, len(flat), vocab_size, k, params.em_iterations)
    rank_of, tables, sizes = _id_tables(z[pos], ids, vocab_size, k)
    ranks, levels = _sorted_within(pos, rank_of[z[pos], ids], levels)
    gaps = gaps_within(ranks, flat)

    # every instance's five streams are slices of five whole-shard arrays (no per-instance numpy work)
    pair_end = np.cumsum(counts.sum(1, dtype=np.int64))
    byte_end = np.cumsum(varint_lengths(gaps))[pair_end - 1] if len(gaps) else np.zeros(n, dtype=np.int64)
    byte_end = np.where(pair_end > 0, byte_end, 0)
    whole = (z.astype(np.uint8), flat.astype(np.uint8), varint_encode(gaps), levels.astype(np.uint8), log_kept)
    bounds = (np.arange(n + 1) * t, np.arange(n + 1) * t, np.concatenate([[0], byte_end]),
              np.concatenate([[0], pair_end]), np.arange(n + 1) * t)
    streams = [memoryview(whole[s][bounds[s][i]:bounds[s][i + 1]]).cast("B")
               for i in range(n) for s in range(STREAMS)]

    cctx = zstandard.ZstdCompressor(level=params.zstd_level, write_checksum=True)
    if threads > 1 and streams:    # zstd frames are independent: same bytes as one compress() each
        done = cctx.multi_compress_to_buffer(streams, threads=threads)
        frames = [done[i].tobytes() for i in range(len(done))]
    else:
        frames = [cctx.compress(stream) for stream in streams]
    frame_sizes = np.array([len(f) for f in frames], dtype=np.int64).reshape(n, STREAMS)
    table_ids = np.concatenate(tables) if tables else np.zeros(0, dtype=np.int64)
    index = b"".join([
        np.array([n, t, vocab_size, k, params.levels], dtype="<u4").tobytes(), struct.pack("<d", scale),
        centroids.astype("<f4").tobytes(), sizes.astype("<u4").tobytes(), frame_sizes.astype("<u4").tobytes(),
        varint_encode(gaps_within(table_ids, sizes.reshape(-1))).tobytes()])
    index = cctx.compress(index)
    return b"".join([MAGIC, struct.pack("<I", len(index)), index, *frames])


def _sorted_within(pos: np.ndarray, ranks: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each position's pairs ordered by rank, their levels along: ``lexsort((ranks, pos))``'s order, as one
    stable argsort of ``pos << 32 | rank`` int64 keys (the same permutation, ties included; ~10x faster, the
    pairs come nearly sorted)."""
    if len(pos) and (int(pos[-1]) >= 1 << 31 or int(ranks.max()) >= 1 << 32):     # keys would not fit: lexsort
        order = np.lexsort((ranks, pos))
    else:
        order = np.argsort((pos << 32) | ranks, kind="stable")
    return ranks[order], levels[order]
