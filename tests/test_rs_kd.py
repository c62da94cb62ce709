"""RS-KD sampled teacher targets (refine.core.sparse_sampling): weights, unbiasedness, determinism, the sampled
store kind, the online sampled signal, and store re-truncation (a smaller top-p-k budget without a teacher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.losses import kd_loss
from distill.signal import OfflineTeacher, OnlineTeacher
from refine.core.errors import InputError
from refine.core.logits import LogitsStore, LogitsWriter, StoreHeader, retruncate, truncate_top_p_k
from refine.core.sparse_sampling import sample_sparse

V = 30


def _teacher(rows: int, seed: int = 0):
    full = torch.log_softmax(torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2, -1)
    top = torch.topk(full, 10, -1)
    return full, top.indices, top.values


def _dense(ids, logw, counts):
    n = logw.shape[-1]
    w = logw.exp().masked_fill(torch.arange(n) >= counts[..., None], 0)
    return torch.zeros(ids.shape[0], V).scatter_add_(1, ids, w)


def test_temperature_one_weights_are_draw_frequencies_and_the_tail_is_the_rest():
    _, ids, lps = _teacher(4)
    ids_s, logw, counts = sample_sparse(ids, lps, 40, 1.0, torch.Generator().manual_seed(1))
    w = logw.exp().masked_fill(torch.arange(40) >= counts[:, None], 0)
    assert torch.allclose(w * 40, (w * 40).round(), atol=1e-4)            # c_i / N
    assert (w.sum(-1) <= 1 + 1e-6).all() and (w.sum(-1) > 0.5).all() and (counts <= 10).all()
    assert (torch.diff(logw[:, :int(counts.min())], dim=-1) <= 0).all()   # heaviest first
    for r in range(4):                                                    # ids are distinct candidates
        kept = ids_s[r, :counts[r]].tolist()
        assert len(set(kept)) == len(kept) and set(kept) <= set(ids[r].tolist())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_estimate_is_unbiased_for_the_teacher_distribution(temperature):
    """Averaged over many draws, the weights converge to the teacher's probabilities (also with a flatter
    proposal, through the importance weights), tail included; top-k renormalised does not."""
    full, ids, lps = _teacher(3)
    reps = 2000                                                           # 2000 independent draws of each row
    draws = sample_sparse(ids.repeat(reps, 1), lps.repeat(reps, 1), 16, temperature, torch.Generator().manual_seed(0))
    acc = _dense(*draws).reshape(reps, 3, V).mean(0)
    target = torch.zeros(3, V).scatter_(1, ids, lps.exp())               # the teacher on its top-10; 0 elsewhere
    assert (acc - target).abs().max() < 0.015
    topk_renorm = torch.zeros(3, V).scatter_(1, ids, torch.softmax(lps, -1))
    assert (topk_renorm - target).abs().max() > 0.02                      # the bias RS-KD removes


def _gradient_target(ids, logw, counts, policy: str, student: torch.Tensor) -> torch.Tensor:
    """The target the KD gradient pulls the student to, per row: d loss / d z = q - target (kld, tau = 1)."""
    from distill.losses import kd_from_log_q

    z = student.expand(ids.shape[0], -1).clone().requires_grad_()
    mask = torch.arange(ids.shape[-1]) < counts[:, None]
    loss = kd_from_log_q(torch.log_softmax(z, -1).gather(-1, ids), logw, mask, "kld", 1.0, policy).sum()
    (grad,) = torch.autograd.grad(loss, z)
    return torch.softmax(z.detach(), -1) - grad


@pytest.mark.parametrize("candidates,temperature", [("full", 1.0), ("full", 2.0), ("top10", 1.0), ("top10", 2.0)])
def test_the_default_missing_mass_policy_of_sampled_signals_is_the_least_biased(candidates, temperature):
    """Over many draws, the target the KD gradient pulls the student to, against the best target the signal can
    give: the teacher itself when the draws come from the full vocabulary (the online teacher), and the teacher on
    its top-K candidates plus the rest of the mass spread like the student (which tokens make up the tail is not
    stored) when they come from the engine's top-K plus a lumped tail (offline stores). The defaults
    (``distill.kd``: online ``none``, offline ``tail``) are unbiased, resp. the least biased of the three; the
    old default ``renorm`` moves the tail's mass onto the drawn ids (issue 16)."""
    full, ids, lps = _teacher(1, seed=3)
    p, reps = full.exp()[0], 20000
    student = torch.randn(1, V, generator=torch.Generator().manual_seed(4))
    if candidates == "full":
        draws = sample_sparse(torch.arange(V).expand(reps, V), full.expand(reps, V), 8, temperature,
                              torch.Generator().manual_seed(2), with_tail=False)
        best = p
    else:
        draws = sample_sparse(ids.expand(reps, -1), lps.expand(reps, -1), 8, temperature,
                              torch.Generator().manual_seed(2))
        q, rest = torch.softmax(student, -1)[0], torch.ones(V, dtype=torch.bool)
        rest[ids[0]] = False
        best = torch.where(rest, (1 - p[ids[0]].sum()) * q / q[rest].sum(), p)
    tv = {policy: 0.5 * (_gradient_target(*draws, policy, student).mean(0) - best).abs().sum().item()
          for policy in ("none", "tail", "renorm")}
    print(f"{candidates} candidates, t={temperature}: total variation from the best target {tv}")
    if candidates == "full":
        assert tv["none"] < 0.01                                       # Monte-Carlo noise only, at any t
        assert tv["renorm"] > 0.04 if temperature != 1 else True       # the self-normalised ratio's bias
    else:
        assert tv["tail"] < tv["none"] < tv["renorm"] and tv["tail"] < 0.045 and tv["renorm"] > 0.15


def test_same_seed_same_draws_and_full_vocabulary_has_no_tail():
    full, _, _ = _teacher(5)
    vocab = torch.arange(V).expand(5, V)
    a = sample_sparse(vocab, full, 12, 1.0, torch.Generator().manual_seed(7), with_tail=False)
    b = sample_sparse(vocab, full, 12, 1.0, torch.Generator().manual_seed(7), with_tail=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.allclose(_dense(*a).sum(-1), torch.ones(5), atol=1e-5)
    with pytest.raises(ValueError):
        sample_sparse(vocab, full, 256)


def test_sampled_store_round_trip_and_distiller_rules(tmp_path, tiny_model_dir):
    from distill.config import KDConfig
    from distill.kd import Distiller

    full, ids, lps = _teacher(2 * 7)
    s_ids, logw, counts = sample_sparse(ids, lps, 20, 1.0, torch.Generator().manual_seed(0))
    header = StoreHeader(V, "h", 1.0, 20, 7, kind="sampled", samples=20)
    w = LogitsWriter(tmp_path / "rs", header)

    class _Train:                                                          # what Distiller checks of data.train
        def __len__(self):
            return 2
        seq_len, folder, index = 8, "train", {"tokens_sha256": "0" * 64}
    w.finish([w.write_shard(0, s_ids.reshape(2, 7, 20).numpy(), logw.reshape(2, 7, 20).numpy(),
                            counts.reshape(2, 7).numpy().astype(np.uint8))], instances=_Train())
    store = LogitsStore(tmp_path / "rs", verify=True)
    assert store.header.kind == "sampled" and store.header.samples == 20
    sig = OfflineTeacher(store).signal(np.array([1]))
    assert torch.equal(sig.mask.sum(-1)[0], counts.reshape(2, 7)[1])
    assert torch.allclose(sig.kept_mass()[0], _dense(s_ids, logw, counts).sum(-1).reshape(2, 7)[1], atol=1e-3)

    for bad in ({"temperature": 2.0}, {"adaptive_temperature": True}, {"loss": "mse"}):
        cfg = KDConfig(signal="offline", logits=str(tmp_path / "rs"), teacher=str(tiny_model_dir), **bad)
        with pytest.raises(InputError, match="sampled"):
            Distiller(cfg, _Train(), "h", torch.device("cpu"), 10)
    ok = Distiller(KDConfig(signal="offline", logits=str(tmp_path / "rs"), teacher=str(tiny_model_dir)),
                   _Train(), "h", torch.device("cpu"), 10)
    assert ok.sampled


def test_online_sampled_signal_is_seeded_by_row(tiny_model_dir):
    rows = np.random.default_rng(0).integers(0, 400, size=(2, 24))
    teacher = OnlineTeacher(str(tiny_model_dir), rs_samples=16, seed=3)
    a = teacher.signal(np.array([4, 9]), torch.as_tensor(rows))
    b = teacher.signal(np.array([4, 9]), torch.as_tensor(rows))
    c = teacher.signal(np.array([5, 9]), torch.as_tensor(rows))
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids[0], c.ids[0])
    assert torch.equal(a.ids[1], c.ids[1]) and torch.equal(a.logprobs[1], c.logprobs[1])   # row 9: its own stream
    alone = teacher.signal(np.array([9]), torch.as_tensor(rows[1:]))       # another grouping (ranks, micro-batches)
    assert torch.equal(alone.ids[0], a.ids[1]) and torch.equal(alone.mask[0], a.mask[1])
    assert torch.allclose(a.kept_mass(), torch.ones(2, 23), atol=1e-5)   # full vocabulary: no tail
    assert (a.mask.sum(-1) <= 16).all()
    student = torch.randn(2, 23, 400, generator=torch.Generator().manual_seed(1))
    assert kd_loss(student, a, "kld").isfinite()


def test_retruncate_equals_a_direct_capture_with_the_smaller_budget(tmp_path):
    logits = torch.randn(5, 9, V, generator=torch.Generator().manual_seed(2)) * 3
    top = torch.topk(torch.log_softmax(logits, -1), 20, -1)
    # float16-exact values: the big store keeps float16, so the two truncations see the same numbers
    ids, lps = top.indices.numpy().astype(np.int32), top.values.numpy().astype(np.float16).astype(np.float32)

    def capture(folder, p, k):
        w = LogitsWriter(tmp_path / folder, StoreHeader(V, "h", p, k, 9))
        w.finish([w.write_shard(0, ids[:3], lps[:3]), w.write_shard(1, ids[3:], lps[3:])])
        return LogitsStore(tmp_path / folder)

    big = capture("big", 0.99, 20)
    small = retruncate(tmp_path / "big", tmp_path / "small", 0.9, 6, shard_size=2)
    direct = capture("direct", 0.9, 6)
    assert len(small) == 5 and small.header.top_k == 6 and small.header.top_p == 0.9
    for i in range(5):
        a, b = small[i], direct[i]
        assert np.array_equal(a.counts, truncate_top_p_k(lps, 0.9, 6)[i])
        assert np.array_equal(a.counts, b.counts) and np.array_equal(a.ids, b.ids)
        assert np.array_equal(a.logprobs, b.logprobs)
    assert small.bytes_per_token() < big.bytes_per_token()
    with pytest.raises(InputError, match="cannot give"):
        retruncate(tmp_path / "small", tmp_path / "x", 0.95, 6)
