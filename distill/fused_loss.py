"""LM cross entropy + sparse KD in one pass over the vocabulary, chunk by chunk from hidden states.

The plain way (``model(...).logits`` then ``lm_loss`` and ``kd_loss``) materialises [tokens, vocab] fp32
logits, a log-softmax of them for the LM loss, a second one for the KD loss, and a gradient of each: with a
49k-152k vocabulary these dominate a small student's step time and memory. Here the student's last hidden
states go through the LM head ``chunk_rows`` positions at a time, and for each chunk:

1. ``z = h @ W^T`` ([n, V], fp32 accumulate; the matmul in the autocast dtype, bf16 on CUDA);
2. the few numbers every loss needs are read off it: ``lse = logsumexp(z)`` (one max + one exp pass, shared by
   the LM and the KD loss), the target logit ``z[y]``, the kept-id logits ``z[S]`` (K per position), and with
   a temperature tau != 1 ``lse_tau = logsumexp(z / tau)``;
3. the losses are computed from those small tensors by the same code as the reference path
   (``distill.losses.kd_from_log_q``), and autograd on them alone gives d loss / d (lse, lse_tau, z[y], z[S]);
4. the gradient of the chunk's logits is then exact and cheap: ``softmax(z) * dlse (+ softmax(z/tau) *
   dlse_tau / tau)`` written over the exp buffer in place, plus scatter-adds at y and S;
5. ``dh = dz @ W`` and ``dW += dz^T @ h`` are taken right away (as Liger-Kernel's fused linear cross entropy
   does), so backward only scales them by the incoming gradient and nothing is recomputed.

So no [tokens, vocab] tensor ever exists, only one [chunk, vocab] buffer (two with tau != 1), and the KD loss
adds gathers of K ids to the LM loss, not a second softmax. Every KD loss, temperature (scalar or per
position) and missing-mass policy of ``distill.losses`` is supported, because step 3 calls its code.

    loss, lm, kd = fused_lm_kd(hidden, head_weight, targets, signal, lm_weight=1 - alpha, kd_weight=alpha)
"""

from __future__ import annotations

import torch

from distill.losses import kd_from_log_q

IGNORE = -100   # a target position without a token (padding): no LM loss there, as in F.cross_entropy
# Chunk size in logits elements (rows = CHUNK_ELEMENTS // vocab): 8M fp32 = 32 MB, ~170 rows at 49k.
CHUNK_ELEMENTS = 1 << 23
# Config attributes that make a model's logits differ from hidden @ W^T; such heads take the unfused path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def lm_head_weight(model) -> torch.Tensor | None:
    """The [V, D] weight if the model's logits are exactly ``hidden @ W^T`` (no bias, scale or softcap)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    if any(getattr(model.config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return None
    return head.weight


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int, chunk_rows: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely ids per position and their full-softmax log-probs, most likely first, from hidden
    states [..., D] chunk by chunk (a live teacher's signal without its [tokens, vocab] log-softmax)."""
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    hidden = hidden.reshape(-1, d)
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    ids, lps = [], []
    for a in range(0, hidden.shape[0], rows):
        z = (hidden[a:a + rows] @ weight.T).float()
        top = torch.topk(z, k, dim=-1)
        ids.append(top.indices)
        lps.append(top.values - torch.logsumexp(z, dim=-1, keepdim=True))
    return torch.cat(ids).reshape(*lead, k), torch.cat(lps).reshape(*lead, k)


class _FusedLMKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, kd, lm_weight, kd_weight, chunk_rows):
        n, dev = hidden.shape[0], hidden.device
        # the means' denominators: positions with a target (IGNORE pads a re-tokenized row) and positions with a
        # teacher target (a cross-tokenizer signal has none where the tokenizations do not align); both are n
        # for a same-tokenizer batch
        counts = (max(int((targets != IGNORE).sum()), 1),
                  max(int(kd["mask"].any(-1).sum()), 1) if kd is not None else n, n)
        cd = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else hidden.dtype
        with torch.autocast(dev.type, enabled=False):
            w = weight.to(cd)
            grad_h = torch.empty_like(hidden)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
            lm_sum = torch.zeros((), device=dev)
            kd_sum = torch.zeros((), device=dev)
            for a in range(0, n, chunk_rows):
                h = hidden[a:a + chunk_rows].to(cd)
                dz, lm_c, kd_c = _chunk(h @ w.T, targets[a:a + chunk_rows], kd, a, counts, lm_weight, kd_weight)
                dz = dz.to(cd)
                grad_h[a:a + chunk_rows] = (dz @ w).to(hidden.dtype)
                if cd == torch.float32:
                    grad_w.addmm_(dz.T, h)
                else:
                    grad_w += (dz.T @ h).float()
                lm_sum += lm_c
                kd_sum += kd_c
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        lm_mean, kd_mean = lm_sum / counts[0], kd_sum / counts[1]
        ctx.mark_non_differentiable(lm_mean, kd_mean)
        return lm_weight * lm_mean + kd_weight * kd_mean, lm_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss, _lm, _kd):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None, None


def _chunk(z: torch.Tensor, y: torch.Tensor, kd: dict | None, a: int, counts: tuple[int, int, int], lm_weight: float,
           kd_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss parts of one chunk of logits ``z`` [c, V] and d(weighted mean loss)/dz, computed in z's buffer."""
    z = z.float()
    c = z.shape[0]
    has_y = y != IGNORE
    y = y.clamp_min(0)
    z_y = z.gather(1, y[:, None])[:, 0]
    small = {"lse": None, "z_y": z_y}
    tau = None
    if kd is not None:
        ids = kd["ids"][a:a + c]
        small["z_s"] = z.gather(1, ids)
        tau = kd["tau"] if kd["tau"].dim() == 0 else kd["tau"][a:a + c]
    m = z.amax(1, keepdim=True)
    z.sub_(m)
    exp_t = None
    if tau is not None and not bool((tau == 1).all()):
        tau_col = tau if tau.dim() == 0 else tau[:, None]
        exp_t = (z / tau_col).exp_()
        s_t = exp_t.sum(1)
        small["lse_t"] = m[:, 0] / tau_col.squeeze(-1) + s_t.log()
    s = z.exp_().sum(1)                                   # z now holds exp(z - max)
    small["lse"] = m[:, 0] + s.log()

    leaves = {k: v.detach().requires_grad_() for k, v in small.items()}
    with torch.enable_grad():
        lm = (leaves["lse"] - leaves["z_y"]).masked_fill(~has_y, 0).sum()
        kd_part = torch.zeros((), device=z.device)
        if kd is not None:
            log_q = leaves["z_s"] / tau_col - leaves["lse_t"][:, None] if exp_t is not None \
                else leaves["z_s"] - leaves["lse"][:, None]
            kd_part = kd_from_log_q(log_q, kd["logprobs"][a:a + c], kd["mask"][a:a + c], kd["loss"],
                                    tau_col if exp_t is not None else 1.0, kd["missing_mass"],
                                    kd["tau_squared"]).sum()
        n = counts[2]
        total = (lm_weight * lm + kd_weight * kd_part) / n if counts[:2] == (n, n) \
            else lm_weight * lm / counts[0] + kd_weight * kd_part / counts[1]      # one expression: same bits
        names = list(leaves)
        grads = dict(zip(names, torch.autograd.grad(total, [leaves[k] for k in names], allow_unused=True)))

    dz = z.mul_((grads["lse"] / s)[:, None])              # softmax(z) * dL/dlse, in place
    if exp_t is not None and grads.get("lse_t") is not None:
        dz.add_(exp_t.mul_((grads["lse_t"] / (s_t * tau_col.squeeze(-1)))[:, None]))
    dz.scatter_add_(1, y[:, None], grads["z_y"][:, None])
    if kd is not None and grads.get("z_s") is not None:
        dz.scatter_add_(1, kd["ids"][a:a + c], grads["z_s"])
    return dz, lm.detach(), kd_part.detach()


def fused_lm_kd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, signal=None, *,
                lm_weight: float = 1.0, kd_weight: float = 0.0, loss: str = "kld",
                temperature: float | torch.Tensor = 1.0, missing_mass: str = "renorm", tau_squared: bool = False,
                chunk_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lm_weight * LM + kd_weight * KD`` (each a mean over positions), and the two means (detached).

    ``hidden`` [..., D] of the predicting positions, ``targets`` [...] their next tokens (``IGNORE``: none;
    the LM mean is over the others, the KD mean over positions whose signal keeps an id), ``signal`` a
    ``TeacherSignal`` of the same leading shape (or None: LM loss only), ``temperature`` a float or a tensor of
    the leading shape. Same values and gradients as ``lm_loss`` + ``kd_loss`` on ``hidden @ weight.T``.
    """
    d = hidden.shape[-1]
    hidden, targets = hidden.reshape(-1, d), targets.reshape(-1)
    kd = None
    if signal is not None:
        k = signal.ids.shape[-1]
        tau = torch.as_tensor(temperature, dtype=torch.float32, device=hidden.device)
        kd = {"ids": signal.ids.reshape(-1, k), "logprobs": signal.logprobs.reshape(-1, k),
              "mask": signal.mask.reshape(-1, k), "tau": tau.reshape(-1) if tau.dim() else tau,
              "loss": loss, "missing_mass": missing_mass, "tau_squared": tau_squared}
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _FusedLMKD.apply(hidden, weight, targets, kd, float(lm_weight), float(kd_weight), rows)
