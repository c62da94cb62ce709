"""KD losses on a sparse teacher signal: hand-computed values, dense equivalence, gradients, and the
offline (stored) and online (live) teacher giving the same loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.config import KDConfig
from distill.losses import adaptive_temperature, kd_loss
from distill.signal import OfflineTeacher, OnlineTeacher, TeacherSignal, from_sorted_topk
from refine.core.errors import InputError
from refine.core.logits import LogitsStore, LogitsWriter, StoreHeader


def _signal(ids, logprobs):
    ids, lps = torch.tensor([[ids]]), torch.tensor([[logprobs]], dtype=torch.float32)
    return TeacherSignal(ids, lps, torch.isfinite(lps))


# One position, vocabulary 4, teacher keeps ids {0, 2} with probabilities 0.6 and 0.2 (mass 0.8 kept).
Z = torch.tensor([[[1.0, 0.0, 2.0, -1.0]]])
SIG = _signal([0, 2], [math.log(0.6), math.log(0.2)])


def _q():
    return torch.softmax(Z[0, 0], -1).tolist()


def test_kld_nll_rkl_mse_by_hand():
    q = _q()
    p0, p2 = 0.75, 0.25                                        # renormalised over the kept ids
    kld = p0 * math.log(p0 / q[0]) + p2 * math.log(p2 / q[2])
    nll = -(p0 * math.log(q[0]) + p2 * math.log(q[2]))
    qs0, qs2 = q[0] / (q[0] + q[2]), q[2] / (q[0] + q[2])      # student renormalised over the kept ids
    rkl = qs0 * math.log(qs0 / p0) + qs2 * math.log(qs2 / p2)
    zc = [1.0 - 1.5, 2.0 - 1.5]                                # centred logits over S
    tc = [math.log(0.6) - (math.log(0.6) + math.log(0.2)) / 2, math.log(0.2) - (math.log(0.6) + math.log(0.2)) / 2]
    mse = ((zc[0] - tc[0]) ** 2 + (zc[1] - tc[1]) ** 2) / 2
    for name, value in (("kld", kld), ("nll", nll), ("rkl", rkl), ("mse", mse)):
        assert kd_loss(Z, SIG, name).item() == pytest.approx(value, rel=1e-5), name


def test_temperature_and_tail_policy_by_hand():
    tau = 2.0
    q = torch.softmax(Z[0, 0] / tau, -1).tolist()
    w = [0.6 ** (1 / tau), 0.2 ** (1 / tau)]
    p0, p2 = w[0] / sum(w), w[1] / sum(w)
    expected = p0 * math.log(p0 / q[0]) + p2 * math.log(p2 / q[2])
    assert kd_loss(Z, SIG, "kld", temperature=tau).item() == pytest.approx(expected, rel=1e-5)
    q = _q()
    m_t, m_s = 0.2, 1 - q[0] - q[2]
    tail = 0.6 * math.log(0.6 / q[0]) + 0.2 * math.log(0.2 / q[2]) + m_t * math.log(m_t / m_s)
    assert kd_loss(Z, SIG, "kld", missing_mass="tail").item() == pytest.approx(tail, rel=1e-5)
    with pytest.raises(InputError, match="needs kd.temperature=1"):   # refused once, by the config
        KDConfig(signal="online", temperature=2.0, missing_mass="tail")


def _full_signal(teacher_logits):
    lp = torch.log_softmax(teacher_logits, -1)
    top = torch.topk(lp, lp.shape[-1], -1)
    return from_sorted_topk(top.indices, top.values, top_p=1.0, top_k=lp.shape[-1]), lp


def test_full_vocabulary_sparse_kld_equals_dense_kld():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g) * 2
    sig, t_lp = _full_signal(zt)
    dense = F.kl_div(torch.log_softmax(zs, -1), t_lp, log_target=True, reduction="none").sum(-1).mean()
    assert kd_loss(zs, sig, "kld").item() == pytest.approx(dense.item(), rel=1e-5)
    assert kd_loss(zs, sig, "kld", missing_mass="tail").item() == pytest.approx(dense.item(), rel=1e-4)


def test_sparse_gradients_equal_dense_autograd_on_kept_ids():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 4, 40, generator=g), torch.randn(2, 4, 40, generator=g) * 3
    lp = torch.log_softmax(zt, -1)
    top = torch.topk(lp, 8, -1)
    sig = from_sorted_topk(top.indices, top.values, top_p=0.9, top_k=8)
    a = zs.clone().requires_grad_()
    kd_loss(a, sig, "kld").backward()
    # Dense formulation: the renormalised target as a full [V] vector (zero off S), KL against log_softmax.
    p = torch.zeros_like(zs).scatter(-1, sig.ids, torch.softmax(sig.logprobs.masked_fill(~sig.mask, -1e30), -1)
                                     .masked_fill(~sig.mask, 0))
    b = zs.clone().requires_grad_()
    (-(p * torch.log_softmax(b, -1)).sum(-1).mean() + (p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_adaptive_temperature_rises_with_confidence():
    confident = _signal([0, 1, 2], [math.log(0.98), math.log(0.01), math.log(0.01)])
    flat = _signal([0, 1, 2], [math.log(1 / 3)] * 3)
    t_conf, t_flat = adaptive_temperature(confident, 1.0), adaptive_temperature(flat, 1.0)
    assert t_conf.item() > 1.0 > t_flat.item()
    assert adaptive_temperature(flat, 2.0, beta=0.0).item() == pytest.approx(2.0)
    assert kd_loss(Z, SIG, "kld", temperature=adaptive_temperature(SIG, 1.0)).isfinite()


def test_offline_and_online_teacher_give_the_same_loss(tiny_model_dir, tmp_path):
    from refine.scorers.registry import make_scorer

    rows = np.random.default_rng(3).integers(0, 400, size=(3, 32))
    scores = make_scorer("hf", str(tiny_model_dir), top_k=20).score(rows)
    writer = LogitsWriter(tmp_path / "store", StoreHeader(400, "h", 0.9, 20, 31))
    writer.finish([writer.write_shard(0, scores.topk_ids, scores.topk_logprobs)])
    offline = OfflineTeacher(LogitsStore(tmp_path / "store")).signal(np.arange(3))
    online = OnlineTeacher(str(tiny_model_dir), top_p=0.9, top_k=20).signal(None, torch.as_tensor(rows))
    assert torch.equal(offline.mask, online.mask) and torch.equal(offline.ids, online.ids)
    student = torch.randn(3, 31, 400, generator=torch.Generator().manual_seed(4))
    for loss in ("kld", "nll", "rkl"):
        a, b = kd_loss(student, offline, loss).item(), kd_loss(student, online, loss).item()
        assert a == pytest.approx(b, rel=2e-3), loss                  # stored log-probs are float16


def test_offline_prefetch_returns_the_read_it_was_asked_for(tmp_path):
    rng = np.random.default_rng(5)
    lps = np.sort(np.log(rng.dirichlet(np.ones(20), size=(6, 15))), -1)[..., ::-1].copy()
    ids = np.argsort(rng.random((6, 15, 100)), -1)[..., :20]
    writer = LogitsWriter(tmp_path / "store", StoreHeader(100, "h", 0.9, 20, 15))
    writer.finish([writer.write_shard(0, ids[:3], lps[:3]), writer.write_shard(1, ids[3:], lps[3:])])
    teacher, plain = OfflineTeacher(LogitsStore(tmp_path / "store")), OfflineTeacher(LogitsStore(tmp_path / "store"))

    def same(a, b):
        return torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs) and torch.equal(a.mask, b.mask)

    teacher.prefetch(np.array([4, 1]))
    assert same(teacher.signal(np.array([4, 1])), plain.signal(np.array([4, 1])))     # the read ahead
    teacher.prefetch(np.array([0, 2]))
    assert same(teacher.signal(np.array([5, 3])), plain.signal(np.array([5, 3])))     # not those rows: in line
    assert same(teacher.signal(np.array([0, 2])), plain.signal(np.array([0, 2])))     # and nothing stale kept
    shard = tmp_path / "store" / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))                                                      # a read-ahead's error ...
    teacher = OfflineTeacher(LogitsStore(tmp_path / "store", verify="lazy"))       # as the trainer opens it
    teacher.prefetch(np.array([4]))
    with pytest.raises(InputError, match="corrupt"):                                    # ... surfaces at the step
        teacher.signal(np.array([4]))


def test_tau_squared_weights_each_position_by_its_own_tau(tiny_model_dir):
    """Issue 16: with an adaptive temperature, Hinton's tau^2 factor multiplies each position's KD loss by its own
    tau_t^2 (it multiplied the whole KD loss by the batch mean of tau_t^2), in the trainer's loss too."""
    from distill.config import AlphaConfig, KDConfig
    from distill.kd import Distiller
    from refine.core.tokenizer import load_tokenizer, tokenizer_hash

    class _Train:
        def __len__(self):
            return 2
        seq_len = 24

    cfg = KDConfig(signal="online", teacher=str(tiny_model_dir), top_k=8, adaptive_temperature=True,
                   tau_squared=True, alpha=AlphaConfig(schedule="constant", peak=0.5))
    distiller = Distiller(cfg, _Train(), tokenizer_hash(load_tokenizer(tiny_model_dir)), torch.device("cpu"), 10)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)                 # a student that is not the teacher
    batch = torch.as_tensor(np.random.default_rng(2).integers(0, 400, size=(2, 24)))
    _, parts = distiller.loss(student, batch, np.arange(2), 0)
    signal = distiller.teacher.signal(None, batch)
    tau = adaptive_temperature(signal, 1.0)
    assert tau.std() > 0.05                                          # the positions' temperatures differ
    with torch.no_grad():
        logits = student(input_ids=batch).logits[:, :-1]
        per_position = torch.stack([kd_loss(logits[b:b + 1, t:t + 1], TeacherSignal(
            signal.ids[b:b + 1, t:t + 1], signal.logprobs[b:b + 1, t:t + 1], signal.mask[b:b + 1, t:t + 1]),
            "kld", tau[b, t]) for b in range(2) for t in range(23)]).reshape(2, 23)
    assert parts["kd_loss"] == pytest.approx((tau.pow(2) * per_position).mean().item(), rel=1e-4)
    assert parts["kd_loss"] != pytest.approx((tau.pow(2).mean() * per_position.mean()).item(), rel=1e-3)
