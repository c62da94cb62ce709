"""Losses, kept outside the model (torchtitan-style): the trainer gets logits and decides what to optimise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: position t predicts token t+1 of the same packed row.

    Computed in fp32 even under bf16 autocast: the logsumexp over a 49k+ vocabulary loses precision in bf16.
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))


# ---- Knowledge distillation on a sparse teacher signal (distill.signal.TeacherSignal) ----------------------
#
# Notation per position: the teacher's kept ids S (top-p-k, or RS-KD draws), their stored log-probs t_i
# (full-softmax at tau = 1; for a sampled signal log importance weights), the student's logits z. With tau:
#   teacher target  p_i = softmax_S(t_i / tau)            (renormalised over S: the PD paper's target)
#   student         log q_i = log_softmax_V(z / tau)_i    (over the FULL vocabulary, gathered at S)
# Missing-mass policy for the probability outside S (``kd.missing_mass``; ``auto`` picks per signal:
# ``distill.config.auto_missing_mass``):
#   "renorm": ignore it: the target is p above (the top-p-k default; what top-p-k KD usually does). On a sampled
#             signal it is a self-normalised ratio and moves the tail's mass onto the drawn ids: biased;
#   "tail":   keep it as one extra outcome "any other token", with teacher mass m_t = 1 - sum_S exp(t_i)
#             and student mass m_s = 1 - sum_S q_i (tau = 1 only, where m_t is known). The stored-RS-KD default:
#             the stored weights and m_t are unbiased; the tail's tokens are unknown, so its mass goes where the
#             student puts the ids not drawn;
#   "none":   the stored weights as they are, -sum_S exp(t_i) log q_i (tau = 1): the effective target is
#             exp(t_i) on S plus the missing mass spread like the student's q, so the missing mass adds no
#             gradient. On draws from the full vocabulary (the online RS-KD default) this is RS-KD's
#             importance-weighted cross entropy, whose gradient is unbiased at any sampling temperature.
# kld and nll differ by the teacher's entropy, a constant: same gradients, same training; only the logged
# value differs. Do not read a kld-vs-nll difference as a finding.

LOSSES = ("kld", "nll", "rkl", "mse")
MISSING_MASS = ("renorm", "tail", "none")
_EPS = 1e-9
_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012); x is clamped to <= log(1 - 1e-9)'s
    neighbourhood so a kept mass that rounds to 1 gives a floor of log(1e-9), never -inf or NaN (gradients
    included: each branch only sees inputs where it is finite)."""
    x = x.clamp(max=-_EPS)
    near = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near, far)


def _masked_softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)


def kd_loss(student_logits: torch.Tensor, signal, loss: str = "kld", temperature: float | torch.Tensor = 1.0,
            missing_mass: str = "renorm", tau_squared: bool = False) -> torch.Tensor:
    """Mean per-position KD loss from full student logits ``[B, T, V]`` over the predicted positions whose signal
    keeps an id (all of them, but where a cross-tokenizer signal has no aligned teacher position).

    The reference path (tests, small batches): it materialises ``log_softmax`` over the vocabulary. The trainer
    uses ``distill.fused_loss``, which gets the same ``log_q`` at the kept ids chunk by chunk from hidden states.
    ``temperature``: a float or a [B, T] tensor (adaptive temperature).
    """
    tau = _tau_tensor(temperature, student_logits.device)
    log_q = torch.log_softmax(student_logits.float() / tau, dim=-1).gather(-1, signal.ids)
    per_position = kd_from_log_q(log_q, signal.logprobs, signal.mask, loss, tau, missing_mass, tau_squared)
    has_target = signal.mask.any(-1)
    return per_position.mean() if bool(has_target.all()) else per_position.sum() / has_target.sum().clamp_min(1)


def _tau_tensor(temperature: float | torch.Tensor, device) -> torch.Tensor:
    """tau as a float32 tensor that broadcasts against [..., K]: a scalar, or [..., 1] from a per-position tau."""
    tau = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature))
    tau = tau.to(device, torch.float32)
    return tau[..., None] if tau.dim() >= 1 else tau


def kd_from_log_q(log_q: torch.Tensor, t_lp: torch.Tensor, mask: torch.Tensor, loss: str = "kld",
                  tau: torch.Tensor | float = 1.0, missing_mass: str = "renorm", tau_squared: bool = False
                  ) -> torch.Tensor:
    """Per-position KD loss [...] from the student's log-probs at the kept ids, ``log_q`` [..., K]
    (= log_softmax(z / tau) gathered at ``signal.ids``; any value where ``mask`` is False).

    kld = KL(p || q) (PD paper's best), nll = soft cross entropy -sum p log q, rkl = KL(q_S || p) with the
    student renormalised over S, mse = squared error between student logits and teacher log-probs at S, each
    centred over S (logits are shift-invariant, so centred ``tau * log_q`` are the centred logits; the PD
    paper's weak baseline, tau not applied). ``tau_squared``: each position's loss times its own tau^2
    (Hinton's gradient-scale correction; per position, so an adaptive tau weights each position by its tau).
    Which combinations make sense (tail/none at tau = 1, rkl on a normalised target) is the config's rule,
    ``distill.config.KDConfig.check_targets``, checked before any loss is computed.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown KD loss {loss!r} ({' | '.join(LOSSES)})")
    if missing_mass not in MISSING_MASS:
        raise ValueError(f"unknown missing_mass policy {missing_mass!r} ({' | '.join(MISSING_MASS)})")
    out = _per_position(log_q, t_lp.float(), mask, loss, tau, missing_mass)
    if tau_squared:
        tau_t = torch.as_tensor(tau, dtype=out.dtype, device=out.device)
        out = out * (tau_t.squeeze(-1) if tau_t.dim() else tau_t).pow(2)
    return out


def _per_position(log_q, t_lp, mask, loss, tau, missing_mass) -> torch.Tensor:
    if loss == "mse":
        n = mask.sum(-1, keepdim=True).clamp_min(1)
        zs = (tau * log_q).masked_fill(~mask, 0)
        zs_c = zs - zs.sum(-1, keepdim=True) / n
        t_c = t_lp.masked_fill(~mask, 0) - (t_lp.masked_fill(~mask, 0).sum(-1, keepdim=True) / n)
        return (zs_c - t_c).pow(2).masked_fill(~mask, 0).sum(-1) / n.squeeze(-1)
    if missing_mass == "renorm":
        log_q = log_q.masked_fill(~mask, 0.0)
        p = _masked_softmax(t_lp / tau, mask)
        log_p = torch.log(p.clamp_min(_EPS))
        if loss == "kld":
            return (p * (log_p - log_q)).sum(-1)
        if loss == "nll":
            return -(p * log_q).sum(-1)
        q_s = _masked_softmax(log_q, mask)          # rkl over the kept support, student renormalised there
        return (q_s * (torch.log(q_s.clamp_min(_EPS)) - log_p)).masked_fill(~mask, 0).sum(-1)
    p = t_lp.exp().masked_fill(~mask, 0.0)
    log_p = t_lp.masked_fill(~mask, 0.0)
    if missing_mass == "none":
        nll = -(p * log_q.masked_fill(~mask, 0.0)).sum(-1)
        return nll if loss == "nll" else nll + (p * log_p).sum(-1)
    # tail: the masses outside S from log-sum-exps (1 - sum q loses every digit when sum q is near 1)
    log_m_t = log1mexp(t_lp.masked_fill(~mask, float("-inf")).logsumexp(-1))
    # a position with nothing kept: a finite fill keeps logsumexp's gradient finite (its weights are all 0)
    log_m_s = log1mexp(log_q.masked_fill(~mask, -1e4).logsumexp(-1))
    m_t, m_s = log_m_t.exp(), log_m_s.exp()
    log_q = log_q.masked_fill(~mask, 0.0)
    q = log_q.exp().masked_fill(~mask, 0.0)
    if loss == "kld":
        return (p * (log_p - log_q)).sum(-1) + m_t * (log_m_t - log_m_s)
    if loss == "nll":
        return -(p * log_q).sum(-1) - m_t * log_m_s
    return (q * (log_q - log_p)).sum(-1) + m_s * (log_m_s - log_m_t)


def adaptive_temperature(signal, base: float, beta: float = 1.0, low: float = 0.5, high: float = 4.0
                         ) -> torch.Tensor:
    """AdaKD-style per-position temperature from the teacher's confidence, [B, T].

        h_t   = H(p_t) / log(n_t)       normalised entropy of the kept teacher distribution (0 = one-hot)
        tau_t = clamp(base * exp(beta * (0.5 - h_t)), low, high)

    Confident positions (h -> 0) get a higher temperature, so the student also learns the teacher's ranking of
    the alternatives instead of a near one-hot target; uncertain positions (h -> 1) get a lower one, which
    sharpens an already flat target. beta = 0 gives the constant ``base``.
    """
    p = _masked_softmax(signal.logprobs.float(), signal.mask)
    entropy = -(p * torch.log(p.clamp_min(_EPS))).sum(-1)
    n = signal.mask.sum(-1).float()
    h = torch.where(n > 1, entropy / torch.log(n.clamp_min(2)), torch.zeros_like(entropy))
    return (base * torch.exp(beta * (0.5 - h))).clamp(low, high).detach()
