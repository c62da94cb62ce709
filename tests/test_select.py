"""The difference score's definition (sign, length normalisation) and selection determinism and order."""

import numpy as np
import pytest

from refine.core.errors import InputError
from refine.scorers.base import Scores
from refine.select import difference_scores, random_control, select


def test_score_sign_and_length_normalisation():
    # Instance 0: teacher predicts far better than the reference -> high score (kept).
    # Instance 1: both models equally good (common text) -> score 0.
    # Instance 2: neither knows it (noise), reference slightly better -> negative.
    teacher = Scores(np.log(np.array([[0.9, 0.8, 0.9, 0.7], [0.5, 0.5, 0.5, 0.5], [0.01, 0.01, 0.02, 0.01]])))
    ref = Scores(np.log(np.array([[0.1, 0.2, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5], [0.02, 0.01, 0.02, 0.02]])))
    s = difference_scores(teacher.mean_nll(), ref.mean_nll())
    assert s[0] > 0 and s[1] == pytest.approx(0) and s[2] < 0
    assert s[0] == pytest.approx(np.log([0.9, 0.8, 0.9, 0.7]).mean() - np.log([0.1, 0.2, 0.1, 0.1]).mean())
    # Per-token means: doubling a row's length with the same per-token log-probs leaves its score unchanged.
    long_t = Scores(np.tile(teacher.token_logprobs, 2))
    long_r = Scores(np.tile(ref.token_logprobs, 2))
    assert np.allclose(difference_scores(long_t.mean_nll(), long_r.mean_nll()), s)


def test_top_alpha_keeps_corpus_order_and_breaks_ties_by_position():
    scores = np.array([0.1, 3.0, -1.0, 2.0, 2.0, 0.5, 2.0])
    kept = select(scores, alpha=3 / 7)
    assert kept.tolist() == [1, 3, 4]                      # 3.0, then the first two of the tied 2.0s
    assert select(scores, 1.0).tolist() == list(range(7))
    assert select(scores, 0.01).tolist() == [1]            # at least one


def test_sampling_is_seeded_and_tends_to_high_scores():
    scores = np.linspace(-3, 3, 1000)
    a = select(scores, 0.2, mode="sample", temperature=0.5, seed=1)
    assert a.tolist() == select(scores, 0.2, mode="sample", temperature=0.5, seed=1).tolist()
    assert a.tolist() != select(scores, 0.2, mode="sample", temperature=0.5, seed=2).tolist()
    assert (np.diff(a) > 0).all() and len(a) == 200
    assert scores[a].mean() > 1.5                          # mostly the top
    r = select(scores, 0.2, mode="random", seed=1)
    assert abs(scores[r].mean()) < 0.5                     # blind selection: no preference


def test_the_random_control_draws_its_own_noise():
    """With a sample-mode selection's own Gumbel draws, the control kept 0.90 of the same rows at temperature 1
    (scores spread as a refine's); independent draws overlap as chance does (about alpha), whatever the seed."""
    scores = np.random.default_rng(0).normal(0, 0.3, 4000)
    overlaps = []
    for seed in range(3):
        kept = select(scores, 0.3, mode="sample", temperature=1.0, seed=seed)
        control = random_control(len(scores), 0.3, seed)
        assert control.tolist() == random_control(len(scores), 0.3, seed).tolist() and len(control) == len(kept)
        same_noise = select(np.zeros_like(scores), 0.3, mode="sample", seed=seed)   # the old control
        overlaps.append((len(np.intersect1d(kept, control)) / len(kept),
                         len(np.intersect1d(kept, same_noise)) / len(kept)))
    independent, old = np.mean(overlaps, axis=0)
    print(f"sample-mode kept/control overlap: {old:.2f} with the selection's noise, {independent:.2f} own noise")
    assert old > 0.8 and abs(independent - 0.3) < 0.05


def test_bad_alpha_and_mode():
    with pytest.raises(InputError):
        select(np.zeros(3), 0)
    with pytest.raises(InputError):
        select(np.zeros(3), 0.5, mode="best")


def test_byte_normalised_scores_are_token_scores_times_the_length_factor(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    """select.normalize=bytes with one tokenizer: each row's score is its per-token score times
    tokens / (bytes x ln 2), the bytes being those of the text the row predicts (checked against decoding)."""
    from refine.core.pack import pack
    from refine.core.tokenizer import load_tokenizer
    from refine.outputs import byte_normalised

    tok = load_tokenizer(tiny_tokenizer_dir)
    inst = pack(tiny_corpus / "train.jsonl", tok, 64, tmp_path / "inst", quiet=True)
    rng = np.random.default_rng(0)
    teacher, ref = rng.uniform(1, 3, len(inst)), rng.uniform(2, 5, len(inst))
    t_bpb, r_bpb = byte_normalised(inst, tok, teacher, ref)
    by_token, by_byte = difference_scores(teacher, ref), difference_scores(t_bpb, r_bpb)
    texts = [tok.decode(np.asarray(row[1:]).tolist(), skip_special_tokens=True) for row in inst.tokens]
    nbytes = np.array([len(t.encode()) for t in texts])
    whole = np.array(["\ufffd" not in t for t in texts])
    assert whole.sum() > len(inst) // 2               # rows that cut no character: decoding counts their bytes
    factor = (inst.seq_len - 1) / (nbytes * np.log(2))
    assert np.allclose(by_byte[whole], (by_token * factor)[whole], rtol=1e-12)
    assert not np.allclose(by_byte / by_token, by_byte[0] / by_token[0])   # rows differ in bytes per token
