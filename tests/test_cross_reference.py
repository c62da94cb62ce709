"""Difference scores with a reference of another tokenizer (refine.cross_reference): the re-tokenized rows,
which bytes each side counts, the pass over them, and the refusals (per-token scores, unalignable tokenizers)."""

from __future__ import annotations

import numpy as np
import pytest

from refine.config import LogitsConfig, ModelPassConfig, RefineConfig, ScoreUnit, SelectConfig
from refine.core.errors import InputError
from refine.core.instances import Instances, InstanceWriter, TokenizerInfo
from refine.cross_reference import check_fits, cross_bits_per_byte, read_counted, reference_rows
from refine.score_pass import PassConfig, run_pass
from refine.scorers.base import Scores
from refine.select import difference_scores
from tests.test_cross_family import gpt2_style_tokenizer  # noqa: F401  (a fixture)
from tests.test_cross_tokenizer import STUDENT, TEACHER, _bpe


@pytest.fixture(scope="module")
def pair():
    return _bpe(TEACHER), _bpe(STUDENT)


class _ColumnScorer:
    """A fake engine: log p of every row's token j+1 is -(0.5 + 0.1 j), whatever the tokens."""
    top_k = 0

    def score(self, rows):
        cols = np.arange(rows.shape[1] - 1, dtype=np.float32)
        return Scores(np.tile(-(0.5 + 0.1 * cols), (len(rows), 1)))

    def close(self):
        pass


def _pass(inst: Instances, out, scorer) -> np.ndarray:
    cfg = PassConfig(instances=str(inst.folder), out=str(out), model=ModelPassConfig(path="unused"), shard_size=1,
                     logits=LogitsConfig(top_p=1.0, top_k=0), quiet=True)
    run_pass(cfg, scorer=scorer)
    return np.load(out / "nll.npy")


def _hand_rows(teacher, folder) -> Instances:
    """Two teacher rows of 4 tokens: [hello][ world][EOS][hello] and [l][o][ world][EOS] (a row that starts
    inside a word the reference reads as one token)."""
    ids = {t: teacher.convert_tokens_to_ids(t) for t in ("hello", "Ġworld", "l", "o")}
    w = InstanceWriter(folder, 4, TokenizerInfo.of(teacher))
    w.add([ids["hello"], ids["Ġworld"]], "a", "s")
    w.add([ids["hello"], ids["l"], ids["o"], ids["Ġworld"]], "b", "s")
    w.close()
    return Instances(folder)


def test_cross_scores_are_the_hand_computed_bits_per_byte_difference(pair, tmp_path):
    teacher, ref = pair
    inst = _hand_rows(teacher, tmp_path / "inst")
    rows = reference_rows(inst, teacher, ref, tmp_path / "ref_rows")
    # row 0: the reference reads [hel][lo][ wor][ld][EOS][hel][lo]; teacher token 1 (" world") starts at byte 5,
    # where [ wor] starts: counted [ wor][ld][EOS][hel][lo] = 4+2+0+3+2 = 11 bytes; teacher " world" EOS "hello"
    # = 11 bytes. Row 1: [lo][ wor][ld][EOS]; teacher token 1 ("o") starts at byte 1, inside [lo]: counted from
    # [ wor] (6 bytes), the teacher's "o" + " world" = 7 bytes.
    assert [ref.decode(r[:n]) for r, n in zip(rows.tokens, read_counted(rows)[:, 1], strict=True)] == \
        ["hello world<|endoftext|>hello", "lo world<|endoftext|>"]
    assert read_counted(rows).tolist() == [[2, 7, 11, 11], [1, 4, 6, 7]]
    assert rows.seq_len == 7 and (rows.tokens[1, 4:] == ref.eos_token_id).all()      # padded with EOS
    ref_nll = _pass(rows, tmp_path / "reference", _ColumnScorer())
    # columns predict tokens 1..: row 0 counts columns 1..5, row 1 columns 0..2 (never the padding)
    sums = np.array([sum(0.5 + 0.1 * j for j in range(1, 6)), sum(0.5 + 0.1 * j for j in range(0, 3))])
    assert ref_nll == pytest.approx(sums / [5, 3], rel=1e-6)
    teacher_nll = np.array([1.0, 2.0])            # mean over the teacher's 3 predicted tokens
    t_bpb, r_bpb = cross_bits_per_byte(inst, rows, teacher_nll, ref_nll)
    ln2 = np.log(2)
    assert r_bpb == pytest.approx(sums / (np.array([11, 6]) * ln2), rel=1e-6)
    assert t_bpb == pytest.approx(teacher_nll * 3 / (np.array([11, 7]) * ln2), rel=1e-12)
    assert difference_scores(t_bpb, r_bpb) == pytest.approx(r_bpb - t_bpb)
    # written once: a second call with the same rows and tokenizers reuses the folder
    mtime = (tmp_path / "ref_rows" / "tokens.bin").stat().st_mtime_ns
    assert reference_rows(inst, teacher, ref, tmp_path / "ref_rows").folder == rows.folder
    assert (tmp_path / "ref_rows" / "tokens.bin").stat().st_mtime_ns == mtime
    # rows longer than the reference's positions: one line before any scoring
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"max_position_embeddings": 6}')
    with pytest.raises(InputError, match=r"up to 7 of its tokens .*max_position_embeddings \(6\): lower pack"):
        check_fits(rows, tmp_path / "m", ref)


def test_one_tokenizer_through_the_cross_path_gives_the_bytes_path_scores(tiny_tokenizer_dir, tiny_corpus,
                                                                        tiny_reference_dir, tmp_path):
    """With the teacher's own tokenizer, re-tokenized rows are the teacher's rows wherever re-tokenizing the row's
    text gives its tokens back: there the cross path's bits per byte are the same-tokenizer bytes path's."""
    from refine.core.instances import write_subset
    from refine.core.pack import pack
    from refine.core.tokenizer import load_tokenizer
    from refine.outputs import byte_normalised
    from refine.scorers.hf import HFScorer

    tok = load_tokenizer(tiny_tokenizer_dir)
    packed = pack(tiny_corpus / "train.jsonl", tok, 64, tmp_path / "packed", quiet=True)
    inst = write_subset(packed, np.arange(24), tmp_path / "inst")
    rows = reference_rows(inst, tok, tok, tmp_path / "ref_rows")
    scorer = HFScorer(str(tiny_reference_dir))
    same = _pass(inst, tmp_path / "same", scorer)
    cross = _pass(rows, tmp_path / "cross", scorer)
    teacher_nll = np.random.default_rng(0).uniform(1, 3, len(inst))
    t_same, r_same = byte_normalised(inst, tok, teacher_nll, same)
    t_cross, r_cross = cross_bits_per_byte(inst, rows, teacher_nll, cross)
    assert np.allclose(t_cross, t_same, rtol=1e-12)
    counted = read_counted(rows)
    identical = np.array([n == 64 and (np.asarray(rows.tokens[i, :64]) == inst.tokens[i]).all()
                          for i, n in enumerate(counted[:, 1])]) & (counted[:, 0] == 1)
    assert identical.sum() >= len(inst) // 2
    assert np.allclose(r_cross[identical], r_same[identical], rtol=1e-5)
    assert np.allclose(difference_scores(t_cross, r_cross)[identical], difference_scores(t_same, r_same)[identical],
                       rtol=1e-5, atol=1e-6)
    # elsewhere only the row's first word is read differently: the scores stay close
    assert np.abs(r_cross - r_same).max() < 0.1 * r_same.mean()


def test_same_tokenizer_passes_and_scores_are_those_of_before(pair, tmp_path):
    """A reference with the teacher's tokenizer never meets the cross path: its pass over packed rows writes the
    plain per-token mean NLLs (shard json and pass.json as before), and selection scores are the old expressions
    bit for bit, per token and per byte. (Checked once against the commit before the cross path, 31fc08a: a tiny
    refine run per unit, every output file but manifest, pass.json and report.md byte-identical.)"""
    import json

    from refine.outputs import Scored, _scores, byte_normalised

    teacher, _ = pair
    inst = _hand_rows(teacher, tmp_path / "inst")
    nll = _pass(inst, tmp_path / "reference", _ColumnScorer())
    assert np.array_equal(nll, _ColumnScorer().score(np.asarray(inst.tokens)).mean_nll().astype(np.float32))
    shard = json.loads((tmp_path / "reference" / "shard-00000.json").read_text())
    assert shard["tokens"] == 4 and "retokenized" not in json.loads((tmp_path / "reference" / "pass.json").read_text())
    t_nll, r_nll = np.array([1.0, 2.5]), nll.astype(np.float64)
    s = Scored(inst, teacher, None, {}, {}, {"mean_nll": 1.0}, "t", "r", None, 0.0, 0.0)
    assert np.array_equal(_scores(_cfg("tokens"), tmp_path, s, t_nll, r_nll), difference_scores(t_nll, r_nll))
    assert np.array_equal(_scores(_cfg("bytes"), tmp_path, s, t_nll, r_nll),
                          difference_scores(*byte_normalised(inst, teacher, t_nll, r_nll)))
    assert not (tmp_path / "instances_reference").exists()


def _cfg(normalize: str) -> RefineConfig:
    return RefineConfig(select=SelectConfig(normalize=ScoreUnit(normalize)))


def test_per_token_scores_with_another_tokenizer_are_one_refusal(pair, tmp_path):
    from refine.pipeline import _check_tokenizers

    teacher, ref = pair
    ref.save_pretrained(tmp_path / "ref")
    with pytest.raises(InputError, match="another tokenizer than the teacher.*use select.normalize=bytes") as e:
        _check_tokenizers(_cfg("tokens"), tmp_path / "out", teacher, tmp_path / "ref")
    assert "\n" not in str(e.value)
    assert _check_tokenizers(_cfg("bytes"), tmp_path / "out", teacher, tmp_path / "ref") is not None
    teacher.save_pretrained(tmp_path / "same")
    assert _check_tokenizers(_cfg("tokens"), tmp_path / "out", teacher, tmp_path / "same") is None


def test_reselecting_a_cross_reference_folder_per_token_is_refused(pair, tmp_path):
    from refine.outputs import Scored, _scores

    teacher, _ = pair
    inst = _hand_rows(teacher, tmp_path / "inst")
    s = Scored(inst, teacher, None, {}, {}, {"retokenized": True}, "t", "r", None, 0.0, 0.0)
    with pytest.raises(InputError, match="uses another tokenizer than the teacher.*select.normalize=bytes"):
        _scores(_cfg("tokens"), tmp_path, s, np.ones(2), np.ones(2))


def test_unalignable_reference_tokenizers_are_one_clear_error(pair, tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from refine.pipeline import _check_tokenizers

    teacher, _ = pair
    inst = _hand_rows(teacher, tmp_path / "inst")
    lower = _bpe(STUDENT, normalizer=normalizers.Replace("w", "W"))      # rewrites the text's bytes
    with pytest.raises(InputError, match="reference tokenizer .* does not give back the bytes of teacher row 0") as e:
        reference_rows(inst, teacher, lower, tmp_path / "rows")
    assert "\n" not in str(e.value) and not (tmp_path / "rows").exists()
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=wp, eos_token="[UNK]").save_pretrained(tmp_path / "wordpiece")
    with pytest.raises(InputError, match="cannot map its tokens to bytes"):
        _check_tokenizers(_cfg("bytes"), tmp_path / "out", teacher, tmp_path / "wordpiece")


@pytest.mark.integration
def test_refine_with_a_reference_of_another_tokenizer(refine_overrides, request, tmp_path):
    """End to end on tiny models (transformers backend): the reference with another vocabulary scores the
    teacher's rows re-tokenized, the scores are the bits-per-byte difference, the manifest and report name its
    tokenizer, a rerun rescores nothing, and re-selecting per token is refused."""
    import json

    from refine.__main__ import refine
    from tests.conftest import save_tiny_llama
    from tests.test_refine import _cfg as refine_cfg
    from tests.test_refine import _mtimes

    other_tok = request.getfixturevalue("gpt2_style_tokenizer")[1]       # a fixture of test_cross_family
    ref = save_tiny_llama(other_tok, tmp_path / "xref", seed=3, layers=1, init_std=0.1)
    overrides = [o for o in refine_overrides if not o.startswith("reference.path")] + [
        f"reference.path={ref}", "select.normalize=bytes", "pack.max_instances=40", "logits.rs_samples=0"]
    out = tmp_path / "out"
    manifest = refine(refine_cfg(overrides))
    rows, inst = Instances(out / "instances_reference"), Instances(out / "instances_scored")
    assert manifest["reference_tokenizer"]["hash"] == rows.tokenizer.hash != manifest["tokenizer_hash"]
    assert manifest["reference_pass"]["retokenized"] and len(rows) == len(inst) == 40
    key = json.loads((out / "reference" / "key.json").read_text())
    assert key["instances"] == rows.index["tokens_sha256"] and key["counted"] == rows.index["counted_sha256"]
    s = np.load(out / "scores.npz")
    t_bpb, r_bpb = cross_bits_per_byte(inst, rows, s["teacher_nll"], s["ref_nll"])
    assert np.allclose(s["score"], r_bpb - t_bpb) and np.isfinite(s["score"]).all()
    report = (out / "report.md").read_text()
    assert "re-tokenized, scored per byte" in report and "NLL_teacher, bits/byte of the same text)" in report
    assert "diversity" in manifest["report"]          # the reference embeds its own rows
    before = _mtimes(out / "reference")
    refine(refine_cfg(overrides))
    assert _mtimes(out / "reference") == before
    with pytest.raises(InputError, match="use select.normalize=bytes"):
        refine(refine_cfg(overrides + ["select_only=true", "select.normalize=tokens"]))
