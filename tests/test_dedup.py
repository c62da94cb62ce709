"""faiss near-duplicate removal and the diversity measure."""

import numpy as np

from refine.dedup import diversity, near_duplicates


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_near_duplicates_keep_the_first_of_each_group():
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(20, 32)))
    dup = _unit(base[[3, 7]] + 0.01 * rng.normal(size=(2, 32)))      # near copies of 3 and 7
    emb = np.concatenate([base, dup]).astype(np.float32)
    keep = near_duplicates(emb, threshold=0.99)
    assert keep[:20].all() and not keep[20:].any()
    assert near_duplicates(emb, threshold=0.99999).all()                # a stricter threshold keeps them


def test_diversity_orders_sets_as_expected():
    rng = np.random.default_rng(1)
    spread = _unit(rng.normal(size=(200, 16)))
    clustered = _unit(np.ones((200, 16)) + 0.1 * rng.normal(size=(200, 16)))
    assert diversity(spread) > 0.9 and diversity(clustered) < 0.1
    assert diversity(spread[:1]) == 0.0
