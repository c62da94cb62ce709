"""Byte tables of tokenizers (refine.core.token_bytes): which tokenizers are supported, refused in one line when
the table is made for any role (teacher, student, reference, same-tokenizer byte counts), and the one rule for
special tokens' bytes (EOS 0, another special its literal string) on every byte-counting path."""

from __future__ import annotations

import numpy as np
import pytest

from distill.evaluate import row_text_bytes
from refine.core.errors import InputError
from refine.core.retokenize import Retokenizer
from refine.core.token_bytes import byte_lengths, row_bytes, text_bytes, token_bytes
from refine.core.tokenizer import encode_text
from tests.conftest import REPO

MODELS = REPO / ".cache" / "models"
DUMMY_PREFIX = r"^tokenizer .*: SentencePiece with a dummy prefix \(Llama-2 style\).* is not supported"


def _real(name: str):
    """A tokenizer fetched by `make models`, or a clean skip where it is not here."""
    from refine.core.tokenizer import load_tokenizer

    if not (MODELS / name / "tokenizer.json").is_file():
        pytest.skip(f"{name} not fetched (make models)")
    return load_tokenizer(MODELS / name)


def _byte_level(prefix_space: bool = False):
    """Byte-level BPE (GPT-2's alphabet, no merges): EOS id 0, ``<|im_start|>`` id 1, as SmolLM2 numbers them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])


def _sentencepiece(prefix: str):
    """SentencePiece with byte fallback as HF serialises it: ``prefix`` is how it adds its dummy prefix,
    ``prepend`` (Llama 2's Prepend normaliser), ``first``/``always`` (Metaspace's prepend_scheme) or ``never``
    (Gemma's kind: none)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
    for piece in ("▁", "a", "h", "i", "hi", "▁a", "▁hi"):
        vocab[piece] = len(vocab)
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "i"), ("▁", "a"), ("▁", "hi")], byte_fallback=True,
                              unk_token="<unk>", fuse_unk=True))
    if prefix == "prepend":
        sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prefix, split=False)
    strip = [decoders.Strip(" ", 1, 0)] if prefix != "never" else []
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    sp.add_special_tokens(["<unk>", "<s>", "</s>", "<|im_start|>"])
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>"])


def _wordpiece():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "[SEP]": 1, "hi": 2, "##s": 3}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=wp, eos_token="[SEP]", unk_token="[UNK]")


def _row(tok, *docs: str) -> np.ndarray:
    """Documents packed the way packing does: each encoded on its own, EOS between them."""
    ids: list[int] = []
    for j, ids_j in enumerate(encode_text(tok, list(docs))):
        ids += ([tok.eos_token_id] if j else []) + ids_j
    return np.array(ids, dtype=np.int64)


# --- which tokenizers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["prepend", "first", "always"])
def test_dummy_prefix_sentencepiece_is_refused_in_one_line_for_every_role(prefix):
    """Before: the table was made, every row re-tokenized for it failed ("does not give back the bytes"), and as
    a teacher each document counted one phantom space. Now: one line when the table is made, before any row."""
    llama, bpe = _sentencepiece(prefix), _byte_level()
    assert encode_text(llama, ["hi"])[0] == [llama.convert_tokens_to_ids("▁hi")]     # the phantom space
    makers = {"byte table": lambda: token_bytes(llama), "same-tokenizer bytes": lambda: byte_lengths(llama),
              "teacher": lambda: Retokenizer(llama, bpe, ("teacher", "student")),
              "student/reference": lambda: Retokenizer(bpe, llama, ("teacher", "student"))}
    for role, make in makers.items():
        with pytest.raises(InputError, match=DUMMY_PREFIX) as e:
            make()
        assert "\n" not in str(e.value) and "byte-level BPE" in str(e.value) and "Gemma" in str(e.value), role


def test_a_per_byte_refine_with_a_dummy_prefix_teacher_is_refused_before_packing(refine_overrides, tmp_path):
    """The teacher's byte table is needed only at selection (``select.normalize=bytes``): refused at the start,
    not after both scoring passes."""
    from refine.__main__ import refine
    from tests.conftest import save_tiny_llama
    from tests.test_refine import _cfg

    _sentencepiece("prepend").save_pretrained(tmp_path / "sp")
    teacher = save_tiny_llama(tmp_path / "sp", tmp_path / "teacher", seed=0, layers=1)
    overrides = [o for o in refine_overrides if not o.startswith(("teacher.path", "reference.path"))]
    with pytest.raises(InputError, match=DUMMY_PREFIX):
        refine(_cfg([*overrides, f"teacher.path={teacher}", f"reference.path={teacher}", "select.normalize=bytes"]))
    assert not (tmp_path / "out" / "instances_all").exists()


def test_added_prefix_space_of_byte_level_bpe_is_refused_the_same_way():
    with pytest.raises(InputError, match="byte-level BPE with add_prefix_space.* is not supported"):
        token_bytes(_byte_level(prefix_space=True))


def test_wordpiece_is_refused_in_one_line():
    with pytest.raises(InputError, match=r"^tokenizer .*: cannot map its tokens to bytes \(decoder \['WordPiece'\]\)"
                       ) as e:
        Retokenizer(_byte_level(), _wordpiece())
    assert "\n" not in str(e.value)


def test_sentencepiece_without_a_dummy_prefix_round_trips():
    """Gemma's kind (no space added) is supported: the re-tokenized row spells exactly the source's bytes."""
    sp, bpe = _sentencepiece("never"), _byte_level()
    assert token_bytes(sp)[sp.convert_tokens_to_ids("▁hi")] == b" hi"
    row = _row(bpe, "hi a hé", "a hi")
    r = Retokenizer(bpe, sp)(row, key=0)
    assert sp.decode(r.ids) == "hi a hé</s>a hi"
    assert r.ends[-1] == r.source_ends[-1] == len("hi a hé".encode()) + 1 + len("a hi")


@pytest.mark.parametrize("name", ["smollm2-135m", "gpt2-tokenizer", "gemma3-270m"])
def test_the_fetched_tokenizers_are_supported(name):
    tok = _real(name)
    table = token_bytes(tok)
    text = "Hello wörld, 1234  x\n\ty"
    assert b"".join(table[i] for i in encode_text(tok, [text])[0]) == text.encode()


# --- special tokens: one rule on every path ----------------------------------------------------------------------


def _special_row_checks(tok, other):
    """A row [doc with <|im_start|> inside] EOS [doc]: every byte count gives the text's bytes with
    ``<|im_start|>`` as its 12 characters and EOS as none."""
    im = tok.convert_tokens_to_ids("<|im_start|>")
    a, b = encode_text(tok, ["hi "])[0], encode_text(tok, ["a hi"])[0]
    row = np.array([*a, im, *a, tok.eos_token_id, *b], dtype=np.int64)
    want = 2 * len("hi ") + len("<|im_start|>") + len("a hi")
    assert text_bytes(tok)[im] == b"<|im_start|>" and text_bytes(tok)[tok.eos_token_id] is None
    # the same-tokenizer path (refine's select.normalize=bytes) and distill.evaluate's bits per byte
    assert row_bytes(row[None], byte_lengths(tok)).tolist() == [want]
    count, how = row_text_bytes(tok)
    assert how == "token_bytes" and count(row[None]).tolist() == [want]
    # the cross path: the source's bytes, and the target reads the same 12 characters as text
    retok = Retokenizer(tok, other)
    r = retok(row, key=0)
    assert int(retok.src_text_len[row].sum()) == want == int(retok.tgt_text_len[r.ids].sum())
    assert other.decode(r.ids).count("<|im_start|>") == 1 and im not in r.ids[r.ids != other.eos_token_id]


def test_special_tokens_count_their_literal_text_and_eos_none_everywhere():
    _special_row_checks(_byte_level(), _sentencepiece("never"))


def test_special_tokens_of_smollm2_count_the_same_on_every_path():
    _special_row_checks(_real("smollm2-135m"), _real("gpt2-tokenizer"))


def test_evaluate_falls_back_to_decoding_a_tokenizer_without_a_byte_table():
    """A dummy-prefix tokenizer still gets val bits per byte, marked ``decode``: each document's text as decoded
    (the phantom space dropped), ``<|im_start|>`` literal, EOS none."""
    llama = _sentencepiece("prepend")
    row = np.concatenate([_row(llama, "hi a"), [llama.convert_tokens_to_ids("<|im_start|>")], _row(llama, "", "a hi")])
    count, how = row_text_bytes(llama)
    assert how == "decode" and count(row[None]).tolist() == [len("hi a<|im_start|>a hi")]
