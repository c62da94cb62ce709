"""Cross-tokenizer KD: byte alignment of two tokenizations (distill.token_alignment), the signal it builds in the
student's vocabulary, the loss on it, and refusals of what cannot be aligned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.fused_loss import IGNORE, fused_lm_kd
from distill.losses import kd_loss
from distill.signal import TeacherSignal
from distill.token_alignment import CrossTokenizer
from refine.core.errors import InputError
from refine.core.token_bytes import byte_lengths, row_bytes, token_bytes
from tests.conftest import REPO
from tests.test_cross_family import gpt2_style_tokenizer  # noqa: F401  (a fixture)
from tests.test_train import tiny_kd_data  # noqa: F401  (a fixture)


def _bpe(merges: list[str], normalizer=None):
    """A byte-level BPE with GPT-2's byte alphabet, EOS id 0 and exactly the given merges (known boundaries)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    pairs = [tuple(m.split(" ")) for m in merges]
    for a, b in pairs:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


# "hello world": the teacher reads [hello][Ġworld], the student [hel][lo][Ġwor][ld] (Ġ: GPT-2's space)
TEACHER = ["h e", "he l", "hel l", "hell o", "Ġ w", "Ġw o", "Ġwo r", "Ġwor l", "Ġworl d"]
STUDENT = ["h e", "he l", "l o", "Ġ w", "Ġw o", "Ġwo r", "l d"]


@pytest.fixture(scope="module")
def pair():
    return _bpe(TEACHER), _bpe(STUDENT)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_token_bytes_of_byte_level_tokens(pair):
    teacher, _ = pair
    table = token_bytes(teacher)
    assert table[0] is None and table[teacher.convert_tokens_to_ids("Ġworld")] == b" world"
    row = np.array([_ids(teacher, "héllo world") + [0]])
    assert row_bytes(row, byte_lengths(teacher)).tolist() == [len("héllo world".encode())]


def test_token_bytes_of_sentencepiece_pieces():
    """Gemma's kind: ``▁`` is a space, ``<0xNN>`` one byte, special tokens none."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<0xC3>": 2, "<0xA9>": 3, "▁": 4, "h": 5, "i": 6, "hi": 7, "▁hi": 8}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "i"), ("▁", "hi")], byte_fallback=True, unk_token="<unk>"))
    sp.normalizer = normalizers.Replace(" ", "▁")
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    sp.add_special_tokens(["<unk>", "<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="<eos>", unk_token="<unk>")
    table = token_bytes(tok)
    assert table[:4] == [None, None, b"\xc3", b"\xa9"] and table[8] == b" hi" and table[7] == b"hi"
    ids = tok(" hi é", add_special_tokens=False)["input_ids"]
    assert b"".join(table[i] for i in ids) == " hi é".encode()     # byte fallback spells é
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])      # no byte fallback
    assert token_bytes(PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="<eos>"))[8] == b" hi"


def test_alignment_round_trip_on_known_boundaries(pair):
    teacher, student = pair
    cross = CrossTokenizer(teacher, student, seq_len=16)
    row = np.array(_ids(teacher, "hello world") + [0] + _ids(teacher, "hello world"))
    assert [teacher.decode([i]) for i in row] == ["hello", " world", "<|endoftext|>", "hello", " world"]
    a = cross.align(row)
    # the student's tokens are its own tokenization of the same text, EOS for EOS
    assert a.ids.tolist() == _ids(student, "hello world") + [0] + _ids(student, "hello world")
    assert student.decode(a.ids) == teacher.decode(row)
    # byte ends: teacher 5 11 | 12 | 17 23; student 3 5 9 11 | 12 | 15 17 21 23 (EOS: one virtual byte each)
    # predicting positions that end on the same byte pair: 5, 11, 12, 17 (23 ends both rows: nothing follows)
    assert a.teacher.tolist() == [0, 1, 2, 3] and a.student.tolist() == [1, 3, 4, 6] and a.cut == 0
    # the teacher's candidate " world" at its position 0 is the student's " world"? not one student token:
    # unmapped; "hello" is not a student token either; EOS maps to EOS; "h" maps to "h"
    assert cross.id_map[teacher.convert_tokens_to_ids("Ġworld")] == -1
    assert cross.id_map[0] == 0
    assert cross.id_map[teacher.convert_tokens_to_ids("h")] == student.convert_tokens_to_ids("h")
    # seq_len cuts the student row; pairs stay below its last token
    short = CrossTokenizer(teacher, student, seq_len=4).align(row)
    assert short.ids.tolist() == a.ids[:4].tolist() and short.cut == len(a.ids) - 4
    assert short.student.tolist() == [1] and short.teacher.tolist() == [0]


def test_row_edges_that_cut_a_character(pair):
    teacher, student = pair
    cross = CrossTokenizer(teacher, student, seq_len=16)
    full = _ids(teacher, "é hello wé")                  # é is two bytes, two tokens here (no merge)
    row = np.array(full[1:-1])                         # starts after é's first byte, ends after the second é's
    a = cross.align(row)
    assert student.decode(a.ids) == " hello w"         # the cut characters' bytes are left out
    # teacher byte ends 1 2 7 8 9(w) ... ; the student's text starts at byte 1: ends 2(" "),5(hel),7(lo),8(" w")
    t_ends = np.cumsum([len(token_bytes(teacher)[i]) for i in row])
    s_ends = 1 + np.cumsum([len(token_bytes(student)[i]) for i in a.ids])
    assert (t_ends[a.teacher] == s_ends[a.student]).all() and len(a.student) >= 2


def _student_matching(cross, aligned, t_ids, t_lps, t_mask, vocab, spare: int):
    """Student logits [1, S-1, V] equal to the mapped teacher target at every aligned position: renormalised
    (``renorm``), and with the teacher's unmapped mass on the unmapped id ``spare`` (``tail``)."""
    ids, lps, mask, stats = cross.map_signal(aligned, t_ids, t_lps, t_mask)
    renorm = torch.full((1, cross.seq_len - 1, vocab), -40.0)
    tail = renorm.clone()
    for s in range(cross.seq_len - 1):
        if mask[0, s].any():
            kept, at = torch.from_numpy(lps[0, s][mask[0, s]]), torch.from_numpy(ids[0, s][mask[0, s]])
            renorm[0, s, at] = kept - kept.logsumexp(0)
            tail[0, s, at] = kept
            tail[0, s, spare] = torch.log1p(-kept.exp().sum())
    return TeacherSignal(*map(torch.from_numpy, (ids, lps, mask))), {"renorm": renorm, "tail": tail}, stats


def test_loss_is_zero_where_the_student_equals_the_teacher(pair):
    teacher, student = pair
    cross = CrossTokenizer(teacher, student, seq_len=12)
    row = np.array(_ids(teacher, "hello world") + [0] + _ids(teacher, "hello world"))
    a = cross.align(row)
    # hand-made stored candidates: per teacher position, "h", EOS, "hello" (unmapped), "e"
    cand = [teacher.convert_tokens_to_ids(t) for t in ("h", "<|endoftext|>", "hello", "e")]
    t_ids = np.tile(np.array(cand), (1, len(row) - 1, 1))
    t_lps = np.log(np.tile(np.array([0.4, 0.3, 0.2, 0.05], dtype=np.float32), (1, len(row) - 1, 1)))
    t_mask = np.ones_like(t_ids, dtype=bool)
    spare = student.convert_tokens_to_ids("z")
    signal, matching, stats = _student_matching(cross, [a], t_ids, t_lps, t_mask, len(student), spare)
    assert stats["xtok_pos_aligned"] == pytest.approx(len(a.student) / (len(a.ids) - 1))
    assert stats["xtok_mass_kept"] == pytest.approx(0.75 / 0.95)            # "hello" has no student token
    assert signal.mask.any(-1).sum() == len(a.student)
    targets = torch.full((1, cross.seq_len - 1), IGNORE)
    targets[0, :len(a.ids) - 1] = torch.from_numpy(a.ids[1:])
    weight = torch.eye(len(student))                    # hidden @ I = the logits
    for mm, logits in matching.items():
        _, _, kd = fused_lm_kd(logits, weight, targets, signal, lm_weight=0, kd_weight=1, missing_mass=mm)
        assert kd.item() == pytest.approx(0, abs=1e-5)
        assert kd_loss(logits, signal, missing_mass=mm).item() == pytest.approx(0, abs=1e-5)
    _, _, kd = fused_lm_kd(matching["renorm"], weight, targets, signal, lm_weight=0, kd_weight=1, missing_mass="tail")
    assert kd.item() > 0.05                             # tail: the teacher's unmapped 0.2 is not the student's ~0
    moved = matching["renorm"].clone()
    moved[0, a.student, 0] += 3.0                       # the student moves mass onto EOS at the aligned positions
    _, _, kd = fused_lm_kd(moved, weight, targets, signal, lm_weight=0, kd_weight=1)
    assert kd.item() > 0.05
    # padding carries no LM loss: the mean is over the row's real targets
    _, lm, _ = fused_lm_kd(moved, weight, targets, signal)
    real = targets[0] != IGNORE
    expect = torch.nn.functional.cross_entropy(moved[0, real], targets[0, real])
    assert lm.item() == pytest.approx(expect.item(), rel=1e-5)


def test_a_normalising_student_tokenizer_is_refused(pair):
    from tokenizers import normalizers

    teacher, _ = pair
    lower = _bpe(STUDENT, normalizer=normalizers.Lowercase())
    cross = CrossTokenizer(teacher, lower, seq_len=16)
    with pytest.raises(InputError, match="does not give back the bytes of teacher row 7") as e:
        cross.align(np.array(_ids(teacher, "Hello world")), key=7)
    assert "\n" not in str(e.value)
    assert cross.align(np.array(_ids(teacher, "hello world"))).ids.size   # lower-case text survives it


def test_a_tokenizer_without_byte_pieces_is_refused(pair):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=wp, eos_token="[UNK]")
    with pytest.raises(InputError, match="cannot map its tokens to bytes"):
        CrossTokenizer(pair[0], words, seq_len=8)



def _as_text(tok, text: str) -> list[int]:
    """``text``'s ids as packing writes them (``refine.core.tokenizer.encode_text``): special strings are text."""
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


SPECIAL_TEXT = "hello <|im_start|>world <|endoftext|> hello"


def test_special_token_strings_in_a_row_are_text_for_the_student(pair):
    """A document that mentions the student's special strings (its EOS ``<|endoftext|>``, its ``<|im_start|>``)
    re-tokenizes as those characters: no student control id, EOS only at the row's document boundary, offsets
    to the row's last byte (it stopped with "does not give back the bytes ... (a normaliser that rewrites it?)")."""
    from refine.core.retokenize import Retokenizer

    teacher, _ = pair
    student = _bpe(STUDENT)
    student.add_tokens(["<|im_start|>"], special_tokens=True)
    im_start = student.convert_tokens_to_ids("<|im_start|>")
    row = np.array(_as_text(teacher, SPECIAL_TEXT) + [0] + _ids(teacher, "hello world"))
    assert row.tolist().count(0) == 1                          # the teacher row: one real boundary
    a = CrossTokenizer(teacher, student, seq_len=64).align(row, key=3)
    assert a.ids.tolist() == _as_text(student, SPECIAL_TEXT) + [0] + _ids(student, "hello world")
    assert im_start not in a.ids.tolist() and a.ids.tolist().count(0) == 1
    assert student.decode(a.ids.tolist()) == SPECIAL_TEXT + "<|endoftext|>hello world"
    r = Retokenizer(teacher, student, ("teacher", "student"))(row, key=3)
    assert r.ends[-1] == r.source_ends[-1] == len(SPECIAL_TEXT.encode()) + 1 + len(b"hello world")
    # a row packed when special strings were still parsed holds the teacher's control id: its literal text
    old_teacher = _bpe(TEACHER)
    old_teacher.add_tokens(["<|im_start|>"], special_tokens=True)
    old_row = np.array(_ids(old_teacher, "hello <|im_start|>world"))
    assert old_teacher.convert_tokens_to_ids("<|im_start|>") in old_row.tolist()
    b = CrossTokenizer(old_teacher, student, seq_len=64).align(old_row)
    assert b.ids.tolist() == _as_text(student, "hello <|im_start|>world") and im_start not in b.ids.tolist()


@pytest.mark.skipif(not all((REPO / ".cache" / "models" / m / "tokenizer.json").is_file()
                            for m in ("smollm2-135m", "gpt2-tokenizer")), reason="no SmolLM2 / GPT-2 tokenizer")
def test_special_token_strings_are_text_from_smollm2_to_gpt2():
    """A SmolLM2 row of a document that mentions ``<|endoftext|>`` (GPT-2's EOS) and ``<|im_start|>`` (SmolLM2's)
    re-tokenizes with GPT-2 as that text, GPT-2's EOS only at the document boundary."""
    from refine.core.retokenize import Retokenizer
    from refine.core.tokenizer import load_tokenizer

    smol, gpt2 = (load_tokenizer(REPO / ".cache" / "models" / m) for m in ("smollm2-135m", "gpt2-tokenizer"))
    text = "A tokenizer ends a document with <|endoftext|> and opens a chat turn with <|im_start|>user."
    row = np.array(_as_text(smol, text) + [smol.eos_token_id] + _as_text(smol, "Second document."))
    r = Retokenizer(smol, gpt2, ("teacher", "student"))(row, key=0)
    assert r.ids.tolist() == _as_text(gpt2, text) + [gpt2.eos_token_id] + _as_text(gpt2, "Second document.")
    assert r.ids.tolist().count(gpt2.eos_token_id) == 1 and r.ends[-1] == r.source_ends[-1]
    assert gpt2.decode(r.ids.tolist()) == text + "<|endoftext|>Second document."


@pytest.mark.integration
def test_cross_tokenizer_run_trains_on_the_teacher_rows_and_resumes_exactly(tiny_overrides, request, tmp_path):
    """kd.signal=cross_tokenizer end to end on tiny assets: a student with another vocabulary trains on the
    teacher's packed rows re-tokenized, learns from the stored logits, logs what the alignment keeps, and a run
    stopped at a checkpoint and resumed gives the uninterrupted run's losses bit for bit."""
    import json

    from distill.train import train
    from tests.test_train import _cfg, _records

    _, student_tok = request.getfixturevalue("gpt2_style_tokenizer")      # fixtures of test_cross_family, test_train
    kd_data = request.getfixturevalue("tiny_kd_data")
    keep = [o for o in tiny_overrides if o.startswith("paths.")]
    base = ["+experiment=cross_family_kd", "+debug=tiny", *keep, *kd_data, f"model.tokenizer={student_tok}",
            "data.seq_len=112", "schedule=constant", "trainer.eval_every=4", "trainer.ckpt_every=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg(base + ["trainer.max_steps=8", f"run_dir={straight}"]))
    train(_cfg(base + ["trainer.max_steps=4", f"run_dir={split}"]))
    train(_cfg(base + ["trainer.max_steps=8", f"run_dir={split}"]))      # resumes at step 4
    recs = _records(straight, "train")
    assert [r["loss"] for r in recs] == [r["loss"] for r in _records(split, "train")]
    assert all(0.5 < r["xtok_pos_aligned"] <= 1 and 0.3 < r["xtok_mass_kept"] <= 1 for r in recs)
    # the default rule (kd.xtok_targets=first_token) gives every teacher candidate a student id; exact does not
    assert all(r["xtok_mass_kept"] > 0.999 for r in recs)
    train(_cfg(base + ["trainer.max_steps=3", "kd.xtok_targets=exact", f"run_dir={tmp_path / 'exact'}"]))
    assert all(r["xtok_mass_kept"] < 0.999 for r in _records(tmp_path / "exact", "train"))
    assert all(np.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in recs)
    run = json.loads((straight / "run.json").read_text())
    assert run["train_instances"]["path"].endswith("inst")                   # the teacher's rows, fingerprinted


def test_cross_tokenizer_data_must_be_the_teachers_instances(tiny_corpus, tiny_tokenizer_dir, tmp_path):
    from distill.data import open_retokenized
    from refine.core.pack import pack
    from refine.core.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(InputError, match="trains on the teacher's packed instances"):
        open_retokenized(tiny_corpus / "train.jsonl", str(tiny_tokenizer_dir), tok, 64)
    other = _bpe(STUDENT)
    other.save_pretrained(tmp_path / "other")
    inst = pack(tiny_corpus / "val.jsonl", tok, 64, tmp_path / "inst", quiet=True)
    with pytest.raises(InputError, match="kd.teacher's tokenizer"):            # kd.teacher names another tokenizer
        open_retokenized(inst.folder, str(tmp_path / "other"), tok, 64)
    data = open_retokenized(inst.folder, str(tiny_tokenizer_dir), other, 1024)
    batch = data.fetch(np.array([2, 0]))
    assert batch.shape == (2, 1024) and (batch[:, 0] >= 0).all() and (batch[:, -1] == IGNORE).all()
    # row 0 again, as text: the student's tokens spell the teacher row's (less a character cut at its end)
    assert other.decode(batch[1][batch[1] >= 0]) == tok.decode(np.asarray(inst.tokens[0])).rstrip("\ufffd")
