"""The teacher pass's vectorised pieces (issue 15) against straightforward reference implementations: the compact
encoder's clustering over the ids a shard holds, its one-sort ordering, its whole-shard streams and threaded zstd
frames must give the bytes the per-instance encoder of commit 264cd0b gave (written out here as the reference)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import scipy.sparse
import zstandard

from refine.core.logits import compact_encoder as enc
from refine.core.logits.compact_encoder import CodecParams, encode_shard
from refine.core.logits.format import MAGIC, STREAMS
from refine.core.logits.varint import gaps_within, segments, varint_encode, varint_lengths


def _reference_cluster(pos, ids, n_pos, vocab, k, iterations):
    """The EM over the full vocabulary, as it was."""
    if k == 1 or n_pos == 0:
        return np.zeros(n_pos, dtype=np.int64)
    prior = (np.bincount(ids, minlength=vocab) + 0.5) / (n_pos + 1.0)
    z = np.random.default_rng(0).integers(0, k, n_pos)
    member = scipy.sparse.csr_matrix((np.ones(len(ids)), (pos, ids)), shape=(n_pos, vocab))
    for _ in range(iterations):
        hits = np.bincount(z[pos] * vocab + ids, minlength=k * vocab).reshape(k, vocab)
        pi = (hits + prior) / (np.bincount(z, minlength=k)[:, None] + 1.0)
        log_in, log_out = np.log(pi), np.log1p(-pi)
        z_new = (member @ (log_in - log_out).T + log_out.sum(1)).argmax(1)
        if np.array_equal(z_new, z):
            break
        z = z_new
    return z


def _reference_encode(counts, ids, logprobs, vocab) -> bytes:
    """The encoder of 264cd0b: lexsort, then each instance's streams built and compressed one by one."""
    params = CodecParams()
    n, t = counts.shape
    flat = counts.reshape(-1).astype(np.int64)
    ids = ids.astype(np.int64)
    pos, _ = segments(flat)
    v = np.exp(logprobs.astype(np.float64))
    with np.errstate(divide="ignore"):
        log_kept = np.log(np.bincount(pos, weights=v, minlength=len(flat))).astype("<f2")
    scale, levels, centroids = enc._quantise(v, params.levels)
    z = _reference_cluster(pos, ids, len(flat), vocab, params.clusters, params.em_iterations)
    rank_of, tables, sizes = enc._id_tables(z[pos], ids, vocab, params.clusters)
    ranks = rank_of[z[pos], ids]
    order = np.lexsort((ranks, pos))
    gaps, levels = gaps_within(ranks[order], flat), levels[order]
    cctx = zstandard.ZstdCompressor(level=params.zstd_level, write_checksum=True)
    frames, frame_sizes, start = [], np.zeros((n, STREAMS), dtype=np.int64), 0
    for i in range(n):
        stop = start + int(counts[i].sum())
        streams = (z[i * t:(i + 1) * t].astype(np.uint8), counts[i].astype(np.uint8),
                   varint_encode(gaps[start:stop]), levels[start:stop].astype(np.uint8), log_kept[i * t:(i + 1) * t])
        for s, stream in enumerate(streams):
            frames.append(cctx.compress(stream.tobytes()))
            frame_sizes[i, s] = len(frames[-1])
        start = stop
    table_ids = np.concatenate(tables)
    index = cctx.compress(b"".join([
        np.array([n, t, vocab, params.clusters, params.levels], dtype="<u4").tobytes(), struct.pack("<d", scale),
        centroids.astype("<f4").tobytes(), sizes.astype("<u4").tobytes(), frame_sizes.astype("<u4").tobytes(),
        varint_encode(gaps_within(table_ids, sizes.reshape(-1))).tobytes()]))
    return b"".join([MAGIC, struct.pack("<I", len(index)), index, *frames])


def _shard(seed: int, n: int, t: int, vocab: int, k: int = 50, empty_instance: int | None = None):
    """Candidates shaped like a teacher's: Zipf-distributed ids (unique within a position), log-probs sorted,
    some positions with no pairs (RS-KD draws all in the tail) or one; ``empty_instance``: one with none."""
    rng = np.random.default_rng(seed)
    want = rng.integers(1, k + 1, n * t)
    want[rng.random(n * t) < 0.05] = 0
    want[rng.random(n * t) < 0.1] = 1
    if empty_instance is not None:
        want[empty_instance * t:(empty_instance + 1) * t] = 0
    ids, lps = [], []
    for c in want:
        row = np.unique((rng.zipf(1.3, 4 * c + 8) * 7919 + rng.integers(0, 3)) % vocab)[:c]
        rng.shuffle(row)
        p = np.sort(rng.dirichlet(np.ones(len(row)) * 0.3))[::-1] * rng.uniform(0.5, 1.0) if c else np.zeros(0)
        ids.append(row)
        lps.append(np.log(np.maximum(p, 1e-30)))
    counts = np.array([len(r) for r in ids], dtype=np.uint8).reshape(n, t)
    return counts, np.concatenate(ids).astype(np.int64), np.concatenate(lps).astype(np.float32)


@pytest.mark.parametrize("vocab,n,t", [(1024, 6, 40), (49152, 4, 63), (151552, 3, 50)])
def test_encoder_bytes_match_the_reference(vocab, n, t):
    counts, ids, lps = _shard(vocab, n, t, vocab)
    ref = _reference_encode(counts, ids, lps, vocab)
    assert encode_shard(counts, ids, lps, vocab) == ref
    assert encode_shard(counts, ids, lps, vocab, threads=3) == ref


def test_encoder_edge_shards_match_the_reference():
    """An instance with no pairs, a shard with none, one instance."""
    shards = [_shard(7, 3, 20, 5000, empty_instance=1), _shard(8, 1, 30, 5000),
              (np.zeros((2, 5), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    for counts, ids, lps in shards:
        ref = _reference_encode(counts, ids, lps, 5000)
        assert encode_shard(counts, ids, lps, 5000) == ref
        assert encode_shard(counts, ids, lps, 5000, threads=2) == ref


def test_cluster_over_the_seen_ids_is_the_full_vocabulary_em():
    counts, ids, _ = _shard(3, 8, 60, 151552)
    flat = counts.reshape(-1).astype(np.int64)
    pos, _ = segments(flat)
    for k in (1, 4, 16):
        assert np.array_equal(enc._cluster(pos, ids, len(flat), 151552, k, 10),
                              _reference_cluster(pos, ids, len(flat), 151552, k, 10))


def test_sorted_within_is_the_lexsort_order():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 30, 200)
    pos, _ = segments(counts)
    ranks = rng.integers(0, 3000, counts.sum())           # with ties: the order must still be lexsort's
    levels = rng.integers(1, 49, len(ranks))
    order = np.lexsort((ranks, pos))
    for p in (pos, pos + (1 << 31)):                          # the int64 key, and the lexsort beyond its range
        r, lv = enc._sorted_within(p, ranks, levels)
        assert np.array_equal(r, ranks[order]) and np.array_equal(lv, levels[order])


def test_varint_lengths_are_the_encoded_lengths():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2 ** 21 - 1, 2 ** 21, 2 ** 28, 2 ** 35 - 1])
    assert varint_lengths(values).tolist() == [len(varint_encode(np.array([v]))) for v in values]
