"""MiniPLM difference sampling: keep the instances the teacher finds much likelier than the reference does.

    score(x) = mean_t log p_teacher(x_t | x_<t) - mean_t log p_ref(x_t | x_<t) = NLL_ref(x) - NLL_teacher(x)

(``select.normalize=bytes``: bits per byte of the reference minus the teacher's over the same text, the same
ranking scaled per row by tokens / bytes.)

A high score means the large teacher predicts the text much better than the small reference model: text
worth learning. Easy, common text (both models fine) scores near zero and noise (neither model knows it)
scores low, so both are down-sampled. ``select_top`` keeps the top ``alpha`` fraction (ties broken by corpus
position) and returns the kept indices in *original corpus order*. ``select_sample`` instead samples
``alpha * n`` instances without replacement with probability proportional to ``exp(score / temperature)``
(Gumbel-top-k, seeded); as the temperature goes to 0 it becomes ``select_top``.

Run (re-selects from saved scores, no rescoring)::

    python -m refine.select --out refined/ --alpha 0.3
"""

from __future__ import annotations

import numpy as np

from refine.core.errors import InputError


def difference_scores(teacher_nll: np.ndarray, ref_nll: np.ndarray) -> np.ndarray:
    """Per-instance score = NLL_ref - NLL_teacher (mean per-token NLLs, so length-normalised)."""
    if teacher_nll.shape != ref_nll.shape:
        raise InputError(f"teacher and reference scored different instance counts ({teacher_nll.shape} vs "
                         f"{ref_nll.shape})")
    return (ref_nll.astype(np.float64) - teacher_nll.astype(np.float64))


def bits_per_byte(mean_nll: np.ndarray, tokens: int | np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """Per-row bits per byte from a pass's mean NLL (nats) over ``tokens`` predicted tokens that spell ``nbytes``
    bytes (``refine.core.token_bytes.row_bytes``): ``select.normalize=bytes`` scores the same text on a scale
    that does not depend on how it was cut into tokens. A row without bytes (special tokens only) counts 1."""
    return mean_nll.astype(np.float64) * tokens / (np.maximum(nbytes, 1) * np.log(2))


def n_keep(n: int, alpha: float) -> int:
    if not 0 < alpha <= 1:
        raise InputError(f"alpha must be in (0, 1], got {alpha}")
    return max(int(round(alpha * n)), 1)


def select_top(scores: np.ndarray, alpha: float) -> np.ndarray:
    """Indices of the top-alpha scores, returned sorted (corpus order). Deterministic."""
    k = n_keep(len(scores), alpha)
    order = np.lexsort((np.arange(len(scores)), -scores))   # by score desc, then index asc
    return np.sort(order[:k])


def select_sample(scores: np.ndarray, alpha: float, temperature: float, seed: int) -> np.ndarray:
    """Sample without replacement, p ~ exp(score / temperature); returned in corpus order."""
    if temperature <= 0:
        raise InputError(f"sampling temperature must be > 0, got {temperature}")
    gumbel = np.random.default_rng(seed).gumbel(size=len(scores))
    return select_top(scores / temperature + gumbel, alpha)


# The random control's own stream: seeded by select.seed too, but never the selection's noise. With the same
# Gumbel draws, a sample-mode selection and its control overlap far beyond chance (0.90 of the kept rows at
# temperature 1 against 0.30 for independent draws), which shrinks every refined-vs-random comparison.
_CONTROL_STREAM = 0x636F6E74   # "cont"


def random_control(n: int, alpha: float, seed: int) -> np.ndarray:
    """MiniPLM's control: ``alpha * n`` instances chosen blindly, from a stream independent of the selection's."""
    gumbel = np.random.default_rng([seed, _CONTROL_STREAM]).gumbel(size=n)
    return select_top(gumbel, alpha)


def select(scores: np.ndarray, alpha: float, mode: str = "top", temperature: float = 1.0,
           seed: int = 0) -> np.ndarray:
    if mode == "top":
        return select_top(scores, alpha)
    if mode == "sample":
        return select_sample(scores, alpha, temperature, seed)
    if mode == "random":   # the baseline MiniPLM compares with: the same fraction, chosen blindly
        return select_sample(np.zeros_like(scores), alpha, 1.0, seed)
    raise InputError(f"unknown selection mode {mode!r} (top | sample | random)")
