"""Cross-tokenizer KD targets (distill.token_alignment): which student id a teacher candidate becomes
(``kd.xtok_targets``: exact | first_token | skip), byte-fallback twins, merged repeats, the logged statistics, and
bench/xtok_stats.py on a tiny refined folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.losses import kd_loss
from distill.signal import TeacherSignal
from distill.token_alignment import CrossTokenizer
from refine.core.errors import InputError
from refine.core.tokenizer import encode_text
from tests.conftest import REPO
from tests.test_cross_tokenizer import STUDENT, TEACHER, _bpe

MODELS = REPO / ".cache" / "models"


def _have(*names: str) -> bool:
    return all((MODELS / m / "tokenizer.json").is_file() for m in names)


def _ids(tok, text: str) -> list[int]:
    return encode_text(tok, [text])[0]


def _sentencepiece(pieces: list[str]):
    """A SentencePiece-style tokenizer (Gemma's kind): ``▁`` a space, byte fallback, EOS id 1; the plain pieces
    first and the 256 byte pieces ``<0xNN>`` after them, so each byte a plain piece spells has a twin of higher
    id (Gemma's ``\\n`` is id 107, its ``<0x0A>`` 248)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    merges = []
    for p in pieces:                        # each longer piece: its first character + the rest (both pieces)
        if len(p) > 1 and p[0] in vocab and p[1:] in vocab:
            merges.append((p[0], p[1:]))
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    sp = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    sp.normalizer = normalizers.Replace(" ", "▁")
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    sp.add_special_tokens(["<unk>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="<eos>", unk_token="<unk>")


SP_PIECES = ["\n", "▁", "a", "b", "h", "i", "hi", "▁hi", "ab", "\t"]


def _signal_at(n_positions: int, cands: dict[int, list[tuple[int, float]]], k: int = 4):
    """Stored candidates [1, n_positions, k]: ``cands[t]`` = [(teacher id, probability)], the rest padding."""
    ids = np.zeros((1, n_positions, k), dtype=np.int64)
    lps = np.full((1, n_positions, k), -np.inf, dtype=np.float32)
    for t, cs in cands.items():
        for j, (i, p) in enumerate(cs):
            ids[0, t, j], lps[0, t, j] = i, np.log(p)
    return ids, lps, np.isfinite(lps)


def _check_valid(ids, lps, mask):
    """What the losses need: one slot per student id at a position, -inf and id 0 where empty."""
    for pos_ids, pos_mask in zip(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1]), strict=True):
        kept = pos_ids[pos_mask]
        assert len(np.unique(kept)) == len(kept)
    assert np.isneginf(lps[~mask]).all() and (ids[~mask] == 0).all() and np.isfinite(lps[mask]).all()


# "a hello": the teacher reads [a][Ġ][hello], the student [a][Ġ][he][llo] (Ġ: GPT-2's space)
LONG_TEACHER = [*TEACHER, "x y"]
LONG_STUDENT = ["h e", "l l", "ll o"]


@pytest.fixture(scope="module")
def long_pair():
    return _bpe(LONG_TEACHER), _bpe(LONG_STUDENT)


def _planted(long_pair):
    """The row "a hello" and stored candidates after "a ": "hello" 0.7, "x" 0.2, "hel" 0.05; after "a": " " 0.9."""
    teacher, student = long_pair
    cross = CrossTokenizer(teacher, student, seq_len=8)
    row = np.array(_ids(teacher, "a hello"))
    t = teacher.convert_tokens_to_ids
    assert [teacher.decode([i]) for i in row] == ["a", " ", "hello"]
    a = cross.align(row)
    assert [student.decode([i]) for i in a.ids] == ["a", " ", "he", "llo"]
    assert a.student.tolist() == [0, 1] and a.teacher.tolist() == [0, 1] and a.longer.tolist() == [False, True]
    signal = _signal_at(len(row) - 1, {0: [(t("Ġ"), 0.9)], 1: [(t("hello"), 0.7), (t("x"), 0.2), (t("hel"), 0.05)]})
    return cross, a, signal


def _target(ids, lps, mask, pos):
    kept = lps[0, pos][mask[0, pos]]
    return dict(zip(ids[0, pos][mask[0, pos]].tolist(), np.exp(kept - np.logaddexp.reduce(kept)).tolist(),
                    strict=True))


def test_first_token_rule_puts_a_long_teacher_token_on_the_students_true_next_token(long_pair):
    """The teacher's "hello" has no student token: the exact map drops it and, renormalised, gives the student's
    true next token "he" nothing; the first-token rule moves its mass (and "hel"'s) onto "he", summed in one slot,
    and loses none; skip leaves that position out of KD."""
    cross, a, signal = _planted(long_pair)
    student = cross.student_tok
    he, x = student.convert_tokens_to_ids("he"), student.convert_tokens_to_ids("x")
    out = {rule: cross.map_signal([a], *signal, targets=rule) for rule in ("exact", "first_token", "skip")}
    for ids, lps, mask, _ in out.values():
        _check_valid(ids, lps, mask)
        assert ids.shape == (1, cross.seq_len - 1, 4)
    exact, first, skip = (_target(*out[r][:3], pos=1) for r in ("exact", "first_token", "skip"))
    assert exact == {x: pytest.approx(1.0)}                         # "he" gets no target mass at all
    assert first == {he: pytest.approx(0.75 / 0.95), x: pytest.approx(0.2 / 0.95)}
    assert out["first_token"][1][0, 1][out["first_token"][2][0, 1]].max() == pytest.approx(np.log(0.75))
    assert skip == {} and _target(*out["skip"][:3], pos=0) == _target(*out["exact"][:3], pos=0)
    st = {r: o[3] for r, o in out.items()}
    assert st["exact"]["xtok_mass_kept"] == pytest.approx((0.9 + 0.2) / 1.85)
    assert st["first_token"]["xtok_mass_kept"] == pytest.approx(1.0)
    assert st["skip"]["xtok_mass_kept"] == pytest.approx(0.9 / 1.85)
    assert all(s["xtok_teacher_longer"] == pytest.approx(0.5) for s in st.values())
    assert st["skip"]["xtok_pos_covered"] == pytest.approx(0.5) and st["first_token"]["xtok_pos_covered"] == 1
    assert st["exact"]["xtok_true_prob"] == pytest.approx((1 + 0) / 2)   # " " at 0, "he" at 1
    assert st["first_token"]["xtok_true_prob"] == pytest.approx((1 + 0.75 / 0.95) / 2)


def test_first_token_kd_pushes_the_true_next_token_up_where_exact_pushes_it_down(long_pair):
    """The sign of the KD gradient on the student's logit of "he" at the planted position (a uniform student)."""
    cross, a, signal = _planted(long_pair)
    he = cross.student_tok.convert_tokens_to_ids("he")
    grads = {}
    for rule in ("exact", "first_token"):
        ids, lps, mask, _ = cross.map_signal([a], *signal, targets=rule)
        logits = torch.zeros(1, cross.seq_len - 1, len(cross.student_tok), requires_grad=True)
        kd_loss(logits, TeacherSignal(*map(torch.from_numpy, (ids, lps, mask)))).backward()
        grads[rule] = logits.grad[0, a.student[1], he].item()
    assert grads["exact"] > 0 > grads["first_token"]                # gradient descent: exact lowers "he"


def test_the_first_token_map_and_the_exact_map_agree_where_exact_maps(long_pair):
    teacher, student = long_pair
    cross = CrossTokenizer(teacher, student, seq_len=8)
    m = cross.id_map >= 0
    assert (cross.first_map[m] == cross.id_map[m]).all() and (cross.first_map >= 0).all()
    t = teacher.convert_tokens_to_ids
    assert cross.first_map[t("hello")] == cross.first_map[t("hel")] == student.convert_tokens_to_ids("he")
    with pytest.raises(InputError, match="unknown cross-tokenizer target rule 'prefix'"):
        cross.map_signal([], *_signal_at(1, {}), targets="prefix")


def test_a_byte_fallback_twin_maps_to_the_id_the_student_tokenizer_emits():
    """A SentencePiece student spells "\\n", " ", "a"... with a plain piece and a byte piece; the teacher's
    newline must land on the plain piece, the one the student's tokenizer emits (its LM loss trains it), not on
    the byte piece of the higher id (the old bytes -> id table kept the last)."""
    teacher, student = _bpe(TEACHER), _sentencepiece(SP_PIECES)
    cross = CrossTokenizer(teacher, student, seq_len=16)
    nl, byte_nl = student.convert_tokens_to_ids("\n"), student.convert_tokens_to_ids("<0x0A>")
    assert byte_nl > nl and _ids(student, "\n") == [nl]
    for text in ("\n", " ", "a", "\t", "b"):          # one token in both
        assert cross.id_map[_ids(teacher, text)] == _ids(student, text), repr(text)
    # in a row: the target at the position before a newline is the student's own next token there
    row = np.array(_ids(teacher, "hi\nab"))
    a = cross.align(row)
    assert a.ids.tolist() == _ids(student, "hi\nab") and nl in a.ids.tolist()
    t_nl = int(np.flatnonzero(row == _ids(teacher, "\n")[0])[0])
    ids, _, mask, stats = cross.map_signal([a], *_signal_at(len(row) - 1, {t_nl - 1: [(row[t_nl], 1.0)]}))
    s = int(a.student[a.teacher == t_nl - 1][0])
    assert ids[0, s][mask[0, s]].tolist() == [a.ids[s + 1]] == [nl] and stats["xtok_true_prob"] == 1


def test_teacher_twins_on_one_student_id_are_summed_into_one_slot():
    """A SentencePiece teacher's "\\n" and "<0x0A>" are both the byte-level student's newline: one slot, the
    probabilities summed (two slots of one id would count the student's probability twice in the loss)."""
    teacher, student = _sentencepiece(SP_PIECES), _bpe(STUDENT)
    cross = CrossTokenizer(teacher, student, seq_len=16)
    nl, byte_nl, a_ = (teacher.convert_tokens_to_ids(p) for p in ("\n", "<0x0A>", "a"))
    row = np.array(_ids(teacher, "a\na"))
    al = cross.align(row)
    signal = _signal_at(len(row) - 1, {0: [(nl, 0.5), (a_, 0.3), (byte_nl, 0.2)]})
    for rule in ({}, {"targets": "first_token"}):          # the default (exact), first_token
        ids, lps, mask, _ = cross.map_signal([al], *signal, **rule)
        _check_valid(ids, lps, mask)
        got = dict(zip(ids[0, 0][mask[0, 0]].tolist(), np.exp(lps[0, 0][mask[0, 0]]).tolist(), strict=True))
        assert got == {_ids(student, "\n")[0]: pytest.approx(0.7), _ids(student, "a")[0]: pytest.approx(0.3)}


@pytest.mark.skipif(not _have("smollm2-135m", "gpt2-tokenizer"), reason="no SmolLM2 / GPT-2 tokenizer")
def test_smollm2_teacher_gpt2_student_long_tokens():
    """SmolLM2 reads " transformers" as one token, GPT-2 as " transform" + "ers": with the teacher sure of its
    next token (0.9) everywhere, the first-token rule puts that 0.9 on GPT-2's true next token at every position
    where the teacher's token is longer, the exact rule nothing."""
    from refine.core.tokenizer import load_tokenizer

    smol, gpt2 = (load_tokenizer(MODELS / m) for m in ("smollm2-135m", "gpt2-tokenizer"))
    cross = CrossTokenizer(smol, gpt2, seq_len=64)
    row = np.array(_ids(smol, "The Hugging Face library of transformers loads tokenizers in Python.\n\nFine."))
    a = cross.align(row)
    assert a.longer.sum() >= 1
    long_t = int(a.teacher[a.longer][0])
    assert smol.decode([row[long_t + 1]]) == " transformers"
    signal = _signal_at(len(row) - 1, {t: [(row[t + 1], 0.9), (smol.convert_tokens_to_ids("Ġthe"), 0.1)]
                                       for t in range(len(row) - 1)})
    (e_ids, e_lps, e_mask, exact), (f_ids, f_lps, f_mask, first) = (
        cross.map_signal([a], *signal, targets=r) for r in ("exact", "first_token"))
    _check_valid(f_ids, f_lps, f_mask)
    assert gpt2.decode([a.ids[a.student[a.longer][0] + 1]]) == " transform"
    for s in a.student[a.longer]:
        assert _target(f_ids, f_lps, f_mask, s)[a.ids[s + 1]] == pytest.approx(0.9)
        assert a.ids[s + 1] not in _target(e_ids, e_lps, e_mask, s)
    assert first["xtok_mass_kept"] == pytest.approx(1) and exact["xtok_mass_kept"] < 1
    assert first["xtok_true_prob"] > exact["xtok_true_prob"]


@pytest.mark.skipif(not _have("smollm2-135m", "gemma3-270m"), reason="no SmolLM2 / Gemma-3 tokenizer")
def test_smollm2_teacher_gemma_student_newline_is_gemmas_own_newline():
    """Gemma-3 has "\\n" (id 107) and the byte piece "<0x0A>" (248): SmolLM2's newline maps to 107, the id
    Gemma's tokenizer emits."""
    from refine.core.tokenizer import load_tokenizer

    smol, gemma = (load_tokenizer(MODELS / m) for m in ("smollm2-135m", "gemma3-270m"))
    cross = CrossTokenizer(smol, gemma, seq_len=64)
    assert _ids(gemma, "\n") == [gemma.convert_tokens_to_ids("\n")] != [gemma.convert_tokens_to_ids("<0x0A>")]
    for text in ("\n", " ", "!", "\t"):
        t = _ids(smol, text)
        assert len(t) == 1 and cross.id_map[t[0]] == _ids(gemma, text)[0], repr(text)
    row = np.array(_ids(smol, "One line.\nTwo lines."))
    a = cross.align(row)
    t_nl = int(np.flatnonzero(row == _ids(smol, "\n")[0])[0])
    ids, _, mask, _ = cross.map_signal([a], *_signal_at(len(row) - 1, {t_nl - 1: [(row[t_nl], 1.0)]}))
    s = int(a.student[a.teacher == t_nl - 1][0])
    assert ids[0, s][mask[0, s]].tolist() == [a.ids[s + 1]] == _ids(gemma, "\n")


def test_xtok_stats_bench_on_a_tiny_refined_folder(long_pair, tmp_path, monkeypatch, capsys):
    """bench/xtok_stats.py on a refined folder built here: teacher instances_scored, a stored store whose top
    candidate is each row's true next token; per rule the table and the JSON."""
    import sys

    import bench.refine_bench
    from bench import xtok_stats
    from refine.core.logits import LogitsWriter, StoreHeader
    from refine.core.pack import pack
    from refine.core.tokenizer import load_tokenizer, tokenizer_hash

    for name, tok in zip(("teacher", "student"), long_pair, strict=True):
        tok.save_pretrained(tmp_path / name)
    teacher = load_tokenizer(tmp_path / "teacher")
    docs = ["a hello world, hello there", "xy hello hello world", "he said hello"] * 4
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": str(i), "text": d}) + "\n"
                                              for i, d in enumerate(docs)))
    refined = tmp_path / "refined"
    inst = pack(tmp_path / "c.jsonl", teacher, 16, refined / "instances_scored", quiet=True)
    rows = np.asarray(inst.tokens).astype(np.int64)
    k, pool = 3, [teacher.convert_tokens_to_ids(c) for c in ("x", "Ġ", "h")]
    # each position: its true next token 0.7, then two other ids 0.2 and 0.1
    ids = np.array([[[nxt, *[i for i in pool if i != nxt][:2]] for nxt in row[1:]] for row in rows])
    lps = np.log(np.broadcast_to(np.array([0.7, 0.2, 0.1], dtype=np.float32), ids.shape)).copy()
    header = StoreHeader(len(teacher), tokenizer_hash(teacher), 1.0, k, 15)
    writer = LogitsWriter(refined / "teacher" / "logits", header)
    writer.finish([writer.write_shard(0, ids, lps, counts=np.full(ids.shape[:2], k))], instances=inst)
    monkeypatch.setattr(bench.refine_bench, "machine", lambda: {"cpu": "test"})    # (it imports vLLM)
    out = tmp_path / "xtok.json"
    monkeypatch.setattr(sys, "argv", ["xtok_stats.py", "--refined", str(refined), "--seq-len", "24", "--out", str(out),
                                      "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student")])
    xtok_stats.main()
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rules = res["rules"]
    assert set(rules) == {"exact", "first_token", "skip"} and "| first_token | 1.0000 | 1.0000 |" in printed
    assert 0 < res["teacher_longer_of_aligned"] < 1
    assert rules["first_token"]["mass_kept_of_stored"] == pytest.approx(1)
    assert rules["exact"]["mass_kept_of_stored"] < 1 and rules["skip"]["pos_covered_of_aligned"] < 1
    # where the teacher's token is longer its 0.7 on it becomes the student's true next token's: only first_token
    hard = {rule: r["true_prob_where_teacher_longer"] for rule, r in rules.items()}
    assert hard["first_token"] > 0.6 > hard["exact"]
    assert hard["skip"] is None
    print(printed)
