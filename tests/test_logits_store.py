"""Sparse logits store: exact round trip, top-p-k semantics, full-softmax equivalence, damaged shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refine.errors import InputError
from refine.logits_store import LogitsStore, LogitsWriter, StoreHeader, truncate_top_p_k

V, L = 50, 9


def _candidates(n: int, k: int, seed: int = 0):
    """Sorted top-k of random full softmaxes: ([n, L-1, k] ids, log-probs, full log-probs [n, L-1, V])."""
    logits = torch.randn(n, L - 1, V, generator=torch.Generator().manual_seed(seed)) * 3
    full = torch.log_softmax(logits, -1)
    top = torch.topk(full, k, -1)
    return top.indices.numpy().astype(np.int32), top.values.numpy(), full.numpy()


def _store(tmp_path, ids, lps, top_p, top_k, shard_sizes):
    w = LogitsWriter(tmp_path / "s", StoreHeader(V, "tokhash", top_p, top_k, L - 1))
    shards, start = [], 0
    for i, size in enumerate(shard_sizes):
        shards.append(w.write_shard(i, ids[start:start + size], lps[start:start + size]))
        start += size
    w.finish(shards)
    return LogitsStore(tmp_path / "s", verify=True)


def test_truncation_is_top_p_then_top_k():
    lp = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]]))
    assert truncate_top_p_k(lp, 0.8, 4).tolist() == [2, 1, 4]     # 0.5+0.3 reaches 0.8; 0.9 alone; all four
    assert truncate_top_p_k(lp, 0.85, 4).tolist() == [3, 1, 4]    # the token crossing p is kept
    assert truncate_top_p_k(lp, 1.0, 2).tolist() == [2, 2, 2]     # then top-k caps


def test_round_trip_is_exact_across_shards(tmp_path):
    ids, lps, _ = _candidates(7, 10)
    store = _store(tmp_path, ids, lps, 0.9, 6, [3, 4])
    counts = truncate_top_p_k(lps, 0.9, 6)
    assert len(store) == 7
    for i in range(7):
        rows = store[i]
        assert rows.counts.tolist() == counts[i].tolist()
        keep = np.arange(10) < counts[i][:, None]
        assert rows.ids.tolist() == ids[i][keep].tolist()
        assert np.array_equal(rows.logprobs, lps[i][keep].astype(np.float16))
    assert store.bytes_per_token() > 0


def test_full_vocabulary_and_p_1_gives_the_full_softmax(tmp_path):
    ids, lps, full = _candidates(2, V, seed=1)
    store = _store(tmp_path, ids, lps, 1.0, V, [2])
    for i in range(2):
        dense = store[i].dense(V)
        assert np.allclose(dense, np.exp(full[i]), atol=2e-3)                # float16 log-probs
        assert np.allclose(store[i].kept_mass(), 1.0, atol=2e-3)
        # Temperature renormalises the kept log-probs like softmax(logits / tau).
        tau = 2.0
        assert np.allclose(store[i].dense(V, tau), torch.softmax(torch.from_numpy(full[i]) / tau, -1).numpy(),
                           atol=2e-3)


def test_missing_mass_is_recoverable(tmp_path):
    ids, lps, full = _candidates(3, 10, seed=2)
    store = _store(tmp_path, ids, lps, 0.5, 10, [3])
    rows = store[1]
    counts = truncate_top_p_k(lps, 0.5, 10)[1]
    expected = np.array([np.exp(lps[1, t, :c]).sum() for t, c in enumerate(counts)])
    assert np.allclose(rows.kept_mass(), expected, atol=1e-3) and (rows.kept_mass() < 1).all()


def test_truncated_and_corrupt_shards_are_one_clear_error(tmp_path):
    ids, lps, _ = _candidates(4, 8)
    _store(tmp_path, ids, lps, 0.95, 8, [2, 2])
    shard = tmp_path / "s" / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x40
    shard.write_bytes(bytes(data))
    LogitsStore(tmp_path / "s")                                   # size is fine: only the checksum can tell
    with pytest.raises(InputError, match="checksum mismatch"):
        LogitsStore(tmp_path / "s", verify=True)
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(InputError, match="truncated or missing logits shard"):
        LogitsStore(tmp_path / "s")


def test_foreign_tokenizer_is_refused(tmp_path):
    ids, lps, _ = _candidates(1, 4)
    store = _store(tmp_path, ids, lps, 0.95, 4, [1])
    with pytest.raises(InputError, match="tokenizer"):
        store.check_tokenizer("another")


def test_positions_without_pairs_have_zero_mass_and_no_target(tmp_path):
    """An RS-KD position whose draws all fell outside the candidates stores no pairs."""
    from refine.logits_store import SparseRows

    rows = SparseRows(np.array([2, 0, 1], dtype=np.uint8), np.array([3, 1, 4]), np.log([0.5, 0.25, 0.9]))
    assert np.allclose(rows.kept_mass(), [0.75, 0.0, 0.9])
    dense = rows.dense(V)
    assert np.allclose(dense.sum(-1), [1.0, 0.0, 1.0]) and dense[0, 3] == pytest.approx(2 / 3)
