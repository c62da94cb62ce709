"""Tokenize + pack round trip, reuse of finished packings, and clear errors on damaged or foreign data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill.data import BatchStream, open_instances
from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.pack import pack
from refine.core.tokenizer import load_tokenizer
from tests.conftest import make_docs, write_jsonl


@pytest.fixture
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def test_round_trip(tok, tiny_corpus, tmp_path):
    inst = pack(tiny_corpus / "train.jsonl", tok, 64, tmp_path / "p", quiet=True)
    docs = [json.loads(line) for line in (tiny_corpus / "train.jsonl").read_text().splitlines()]
    stream = []
    for d in docs:
        stream += tok(d["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(inst) == len(stream) // 64 and inst.index["dropped_tail_tokens"] == len(stream) % 64
    assert np.array_equal(np.asarray(inst.tokens).reshape(-1), np.asarray(stream[: len(inst) * 64]))
    # Decoding the rows gives back the documents' text, EOS-separated.
    text = tok.decode(np.asarray(inst.tokens).reshape(-1).tolist())
    assert text.startswith(docs[0]["text"] + tok.eos_token + docs[1]["text"])
    assert inst.tokens.dtype == np.uint16
    assert inst.doc_ids(0)[0] == docs[0]["id"]
    last_ids = inst.doc_ids(len(inst) - 1)
    assert all(i.startswith("doc/") for i in last_ids) and len(last_ids) >= 1


def test_finished_packing_is_reused_and_changed_corpus_repacks(tok, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(50, seed=7))
    first = pack(corpus, tok, 32, tmp_path / "p", quiet=True)
    mtime = (tmp_path / "p" / "tokens.bin").stat().st_mtime_ns
    pack(corpus, tok, 32, tmp_path / "p", quiet=True)
    assert (tmp_path / "p" / "tokens.bin").stat().st_mtime_ns == mtime
    write_jsonl(corpus, make_docs(60, seed=7))
    again = pack(corpus, tok, 32, tmp_path / "p", quiet=True)
    assert len(again) > len(first)


def test_truncated_and_corrupt_tokens_are_clear_errors(tok, tiny_corpus, tmp_path):
    pack(tiny_corpus / "val.jsonl", tok, 16, tmp_path / "p", quiet=True)
    path = tmp_path / "p" / "tokens.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01                                     # a bit flip keeps the size: only the checksum sees it
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum"):
        Instances(tmp_path / "p").verify()
    path.write_bytes(bytes(data[:-3]))
    with pytest.raises(InputError, match="truncated"):
        Instances(tmp_path / "p")


def test_tokenizer_mismatch_is_an_error(tok, tiny_corpus, tmp_path):
    pack(tiny_corpus / "val.jsonl", tok, 16, tmp_path / "p", quiet=True)
    other_tok = _other_tokenizer()
    with pytest.raises(InputError, match="tokenized with"):
        open_instances(tmp_path / "p", other_tok, 16, tmp_path / "cache")


def _other_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(["another tiny corpus entirely"] * 10,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>")


def test_corpus_smaller_than_one_instance_is_an_error(tok, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "tiny"}])
    with pytest.raises(InputError, match="too small"):
        pack(corpus, tok, 64, tmp_path / "p", quiet=True)
    assert not (tmp_path / "p").exists()                # nothing half-written left behind


def test_batch_stream_resumes_exactly(tok, tiny_corpus, tmp_path):
    inst = pack(tiny_corpus / "train.jsonl", tok, 32, tmp_path / "p", quiet=True)
    a = BatchStream(inst, 7, seed=3)
    for _ in range(25):                                  # crosses an epoch boundary
        a.next_batch()
    state = a.state_dict()
    peeked = a.peek_rows()                               # reading ahead does not move the stream
    assert a.state_dict() == state and np.array_equal(a.peek_rows(), peeked)
    expected = [a.next_batch() for _ in range(30)]
    assert (expected[0] == a.fetch(peeked)).all()
    b = BatchStream(inst, 7, seed=3)
    b.load_state_dict(state)
    assert all((x == y).all() for x, y in zip(expected, (b.next_batch() for _ in range(30))))
    # One epoch visits every instance exactly once.
    c = BatchStream(inst, 1, seed=5)
    seen = {tuple(c.next_batch()[0].tolist()) for _ in range(len(inst))}
    assert len(seen) == len({tuple(r) for r in np.asarray(inst.tokens).tolist()})


def test_subset_keeps_rows_and_document_ids(tok, tiny_corpus, tmp_path):
    from refine.core.instances import write_subset

    inst = pack(tiny_corpus / "train.jsonl", tok, 32, tmp_path / "p", quiet=True)
    rows = [0, 5, len(inst) - 1]
    sub = write_subset(inst, rows, tmp_path / "sub")
    assert len(sub) == 3 and sub.tokenizer == inst.tokenizer
    assert np.array_equal(np.asarray(sub.tokens), np.asarray(inst.tokens)[rows])
    assert [sub.doc_ids(i) for i in range(3)] == [inst.doc_ids(r) for r in rows]
    sub.verify()
