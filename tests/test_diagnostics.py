"""refine.diagnostics: the rank figures and the warnings that say a selection cannot be trusted."""

from __future__ import annotations

import numpy as np
import pytest

from refine.diagnostics import score_ranks, spearman, warnings


def test_spearman_is_the_rank_correlation():
    x = np.arange(50, dtype=float)
    assert spearman(x, x ** 3) == pytest.approx(1.0) and spearman(x, -np.exp(x / 10)) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(50))) and np.isnan(spearman(x[:2], x[:2]))


def _figures(teacher, ref, diversity=None):
    return {**score_ranks(ref - teacher, teacher, ref), **({"diversity": diversity} if diversity else {})}


def test_a_healthy_score_warns_of_nothing():
    """Both models find the same text hard (correlated NLLs); the teacher is better by a varying margin."""
    rng = np.random.default_rng(0)
    hard = rng.normal(size=500)
    teacher, ref = 3 + hard, 4 + 1.3 * hard + rng.normal(scale=0.5, size=500)
    figures = _figures(teacher, ref, {"scored": 0.3, "refined": 0.31, "random_same_size": 0.3})
    assert abs(figures["spearman_score_ref_nll"]) < 0.9 and warnings(figures) == []


def test_a_reference_that_ranks_alone_is_warned_of():
    """A weak reference whose NLL varies wildly while the teacher's hardly does: the score is NLL_ref's order."""
    rng = np.random.default_rng(1)
    teacher, ref = 3 + 0.05 * rng.normal(size=500), 6 + rng.normal(size=500)
    (line,) = warnings(_figures(teacher, ref))
    assert "ranked almost entirely by the reference's NLL" in line


def test_a_flat_reference_leaves_the_teachers_order_and_is_warned_of():
    """The reference finds everything about equally hard: the score keeps what the teacher finds easy."""
    rng = np.random.default_rng(2)
    teacher, ref = 3 + rng.normal(size=500), 7 + 0.05 * rng.normal(size=500)
    (line,) = warnings(_figures(teacher, ref))
    assert "ranked almost entirely by the teacher's NLL" in line


def test_a_kept_set_narrower_than_random_is_warned_of():
    rng = np.random.default_rng(0)
    hard = rng.normal(size=500)
    teacher, ref = 3 + hard, 4 + 1.3 * hard + rng.normal(scale=0.5, size=500)
    (line,) = warnings(_figures(teacher, ref, {"scored": 0.37, "refined": 0.11, "random_same_size": 0.38}))
    assert "less diverse than a random set" in line and "0.1100 against 0.3800" in line
