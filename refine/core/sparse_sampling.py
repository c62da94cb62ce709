"""Random-sampling sparse teacher targets (RS-KD: Anshumann et al. 2025, "Sparse Logit Sampling").

Top-k truncation is a *biased* estimate of the teacher distribution: it always drops the tail and, once
renormalised, inflates the head. RS-KD instead draws ``N`` tokens per position from a proposal
``q ∝ p^(1/t)`` (``t``: the sampling temperature; ``t = 1`` samples the teacher itself) and keeps the unique
ids with importance weights

    w_i = (c_i / N) * (p_i / q_i)          c_i = how often id i was drawn

so that ``sum_i w_i f(i)`` is an unbiased estimate of ``E_p[f]`` for any per-token ``f`` (the KD loss's
``-log q_student`` among them): ``E[w_i] = p_i``. With ``t = 1`` the weights are plain frequencies
``c_i / N`` and sum to one with the tail; with ``t != 1`` they sum to one only in expectation. The loss must
not self-normalise them (``renorm`` is a biased ratio estimate); ``distill.config.auto_missing_mass`` picks the
policy that keeps them unbiased.

The candidates can be the full vocabulary (online KD, the transformers scorer) or the top-K a vLLM pass
returned plus the recorded remaining mass ``m = 1 - sum_K p``: the tail is then one extra outcome "another
token". Draws that land there are not identifiable, so they are dropped from the stored ids; their weight is
the mass the stored ids leave out (``1 - sum w``; at ``t != 1`` in expectation), which the loss's missing-mass
policy sees.

One implementation, in torch, for both the refine pass (offline store) and the online teacher.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_SAMPLES = 255  # the store's per-position counts are uint8


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (base seed, shard, row, ...): reproducible and order-sensitive."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def sample_sparse(cand_ids: torch.Tensor, cand_logprobs: torch.Tensor, samples: int, temperature: float = 1.0,
                  generator: torch.Generator | None = None, with_tail: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``samples`` tokens per row from ``softmax(cand_logprobs / t)`` (plus the tail) and merge duplicates.

    ``cand_ids``/``cand_logprobs``: [..., K] candidate ids and their *full-softmax* teacher log-probs.
    ``with_tail``: the mass outside the candidates (``1 - sum exp``) is one more outcome; set it False when
    the candidates are the full vocabulary. Returns ``(ids, logweights, counts)``: [..., samples] ids and
    log importance weights, heaviest first, padded with id 0 / ``-inf`` beyond ``counts`` [...] (the number of
    distinct sampled candidates, tail excluded).
    """
    if not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be in 1..{MAX_SAMPLES}, got {samples}")
    if temperature <= 0:
        raise ValueError(f"sampling temperature must be > 0, got {temperature}")
    lead, k = cand_logprobs.shape[:-1], cand_logprobs.shape[-1]
    lp = cand_logprobs.reshape(-1, k).float()    # fp32: a [rows, 49k] fp64 copy would cost GBs online
    ids = cand_ids.reshape(-1, k).long()
    if with_tail:
        tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp_min(0)
        lp = torch.cat([lp, tail.log()], dim=-1)                         # column K: "another token"
    # At t = 1 the proposal is the teacher itself (lp with its tail sums to one): no second [rows, K] pass.
    log_q = lp if temperature == 1 else torch.log_softmax(lp / temperature, dim=-1)
    draws = torch.multinomial(log_q.exp(), samples, replacement=True, generator=generator)   # [R, N]
    draws, _ = draws.sort(dim=-1)
    # Run-length encode the sorted draws: group g of each draw, its count, its candidate index.
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = first.long().cumsum(-1) - 1
    ones = torch.ones(draws.shape, device=draws.device)
    count = torch.zeros_like(ones).scatter_add_(1, group, ones)
    cand = torch.zeros_like(draws).scatter_(1, group, draws)
    n_groups = first.sum(-1, keepdim=True)
    slot = torch.arange(samples, device=draws.device).expand_as(draws)
    valid = slot < n_groups
    if with_tail:
        valid &= cand != k                                                # tail draws are not stored
    # Importance weights (c / N) * p / q.
    logw = (count / samples).log() + lp.gather(1, cand) - log_q.gather(1, cand)
    logw = logw.masked_fill(~valid, float("-inf"))
    order = logw.argsort(dim=-1, descending=True, stable=True)
    logw = logw.gather(1, order)
    valid = valid.gather(1, order)
    out_ids = ids.gather(1, cand.clamp_max(k - 1).gather(1, order)).masked_fill(~valid, 0)
    counts = valid.sum(-1)
    return (out_ids.reshape(*lead, samples), logw.reshape(*lead, samples), counts.reshape(lead))
