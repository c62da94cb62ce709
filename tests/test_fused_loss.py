"""The fused LM + sparse-KD loss (distill.fused_loss) equals the reference losses, values and gradients, for every
KD loss, temperature and missing-mass policy; hidden states x head weight are the models' logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.fused_loss import fused_lm_kd, lm_head_weight, topk_logprobs
from distill.losses import adaptive_temperature, kd_loss
from distill.signal import from_sorted_topk
from refine.core.forward import forward_logits

B, T, D, V, K = 2, 9, 16, 50, 7


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).requires_grad_()
    weight = torch.randn(V, D, generator=g).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    top = torch.topk(torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, -1), K)
    return hidden, weight, targets, from_sorted_topk(top.indices, top.values, 0.9, K)


def _grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


CASES = [(loss, mm, tau) for loss in ("kld", "nll", "rkl", "mse") for mm in ("renorm", "tail")
         for tau in (1.0, 2.0, "adaptive") if mm == "renorm" or tau == 1.0]


@pytest.mark.parametrize("loss,missing_mass,tau", CASES)
def test_fused_equals_reference(loss, missing_mass, tau):
    hidden, weight, targets, signal = _case()
    temperature = adaptive_temperature(signal, 1.0) if tau == "adaptive" else tau
    z = hidden @ weight.T
    ref_lm = F.cross_entropy(z.reshape(-1, V), targets.reshape(-1))
    ref_kd = kd_loss(z, signal, loss, temperature, missing_mass)
    ref = 0.3 * ref_lm + 0.7 * ref_kd
    # chunk_rows=4 does not divide the 18 positions: the last chunk is short
    out, lm, kd = fused_lm_kd(hidden, weight, targets, signal, lm_weight=0.3, kd_weight=0.7, loss=loss,
                              temperature=temperature, missing_mass=missing_mass, chunk_rows=4)
    assert out.item() == pytest.approx(ref.item(), abs=1e-5)
    assert lm.item() == pytest.approx(ref_lm.item(), abs=1e-5) and kd.item() == pytest.approx(ref_kd.item(), abs=1e-5)
    for got, want in zip(_grads(2 * out, hidden, weight), _grads(2 * ref, hidden, weight)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_lm_only_and_chunking_do_not_change_the_result():
    hidden, weight, targets, _ = _case(1)
    ref = F.cross_entropy((hidden @ weight.T).reshape(-1, V), targets.reshape(-1))
    ref_grad = _grads(ref, hidden)[0]
    for rows in (1, 5, 18, 0):
        out, lm, kd = fused_lm_kd(hidden, weight, targets, chunk_rows=rows)
        assert out.item() == pytest.approx(ref.item(), abs=1e-5) and kd.item() == 0
        torch.testing.assert_close(_grads(out, hidden)[0], ref_grad, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_runs_the_same_code():
    """The CUDA path (bf16 matmuls, fp32 softmax) exercised on CPU: close to fp32, gradients in fp32 params."""
    hidden, weight, targets, signal = _case(2)
    ref, _, _ = fused_lm_kd(hidden, weight, targets, signal, lm_weight=0.5, kd_weight=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, _ = fused_lm_kd(hidden, weight, targets, signal, lm_weight=0.5, kd_weight=0.5)
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)
    gw = _grads(out, weight)[0]
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mamba"])
def test_hidden_times_head_is_the_models_logits(arch):
    from transformers import AutoModelForCausalLM

    from distill.config import ModelConfig
    from distill.models import hf_config

    cfg = ModelConfig(name="t", arch=arch, tokenizer="unused", hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=64, state_size=4, expand=2)
    for tied in (True, False):
        cfg.tie_word_embeddings = tied
        model = AutoModelForCausalLM.from_config(hf_config(cfg, 97, None, 0)).eval()
        x = torch.randint(0, 97, (2, 12))
        weight = lm_head_weight(model)
        assert weight is not None
        hidden = forward_logits(model, x, None, hidden=True)
        torch.testing.assert_close(hidden @ weight.T, model(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_topk_logprobs_from_hidden_states():
    hidden, weight, _, _ = _case(3)
    ids, lps = topk_logprobs(hidden.detach(), weight.detach(), 5, chunk_rows=4)
    top = torch.topk(torch.log_softmax(hidden.detach() @ weight.detach().T, -1), 5)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(lps, top.values)


@pytest.mark.parametrize("options", [{}, {"temperature": 2.0, "tau_squared": True}, {"loss": "rkl"}])
def test_distiller_fused_equals_full_logits_path(tiny_model_dir, monkeypatch, options):
    """The trainer's loss through hidden states equals the full-logits path taken for heads that are not a plain
    matmul (here forced), with a live teacher: loss, logged parts and student gradients."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    import distill.kd
    from distill.config import AlphaConfig, KDConfig
    from distill.kd import Distiller
    from refine.core.tokenizer import load_tokenizer, tokenizer_hash

    class _Train:
        def __len__(self):
            return 4
        seq_len = 24

    cfg = KDConfig(signal="online", teacher=str(tiny_model_dir), alpha=AlphaConfig(schedule="constant", peak=0.6),
                   **options)
    distiller = Distiller(cfg, _Train(), tokenizer_hash(load_tokenizer(tiny_model_dir)), torch.device("cpu"), 10)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = torch.as_tensor(np.random.default_rng(0).integers(0, 400, size=(2, 24)))
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(distill.kd, "lm_head_weight", lambda model: None)
        student.zero_grad()
        loss, parts = distiller.loss(student, batch, np.arange(2), 3)
        loss.backward()
        results.append((loss.item(), parts, [p.grad.clone() for p in student.parameters()]))
    (a, pa, ga), (b, pb, gb) = results
    assert a == pytest.approx(b, abs=1e-5) and pa == pytest.approx(pb, abs=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
