"""refine.core.text_export: the selected rows as documents another tokenizer can re-tokenize, never as packed
rows with the teacher's EOS spelling between documents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refine.core.instances import Instances, write_subset
from refine.core.pack import pack
from refine.core.text_export import write_text_export
from refine.core.tokenizer import load_tokenizer
from tests.conftest import REPO, make_docs, write_jsonl

SMOLLM2 = REPO / ".cache" / "models" / "smollm2-135m"
MENTION = "The GPT-2 separator is written <|endoftext|> in its vocabulary; café, naïve, 東京."


@pytest.fixture
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _corpus(tmp_path, seq_len: int, tok) -> tuple[Instances, list[dict]]:
    docs = make_docs(30, seed=7)
    docs[3]["text"] = MENTION
    docs[11]["text"] = "Ünïcödé " * 9 + docs[11]["text"]      # multi-byte characters a row edge can split
    inst = pack(write_jsonl(tmp_path / "c.jsonl", docs), tok, seq_len, tmp_path / "p", quiet=True)
    return inst, docs


def _export(inst, rows, tok, tmp_path) -> list[dict]:
    path = tmp_path / "refined.jsonl"
    n = write_text_export(inst, np.asarray(rows), np.arange(len(inst), dtype=np.float64), tok, path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == n
    return records


def test_every_row_kept_gives_back_the_documents(tok, tmp_path):
    """All rows selected: one record per document, its text exactly the corpus document's, the one that mentions
    ``<|endoftext|>`` included; no EOS spelling anywhere else (the old export joined documents with it)."""
    inst, docs = _corpus(tmp_path, 16, tok)
    records = _export(inst, range(len(inst)), tok, tmp_path)
    by_id = {d["id"]: d for d in docs}
    whole = [r for r in records if r["whole"]]
    assert [r["doc_id"] for r in records] == [d["id"] for d in docs[:len(records)]]      # corpus order
    assert len(whole) >= len(records) - 1                       # only the document the tail cut is a piece
    for r in whole:
        assert r["text"] == by_id[r["doc_id"]]["text"] and r["start"] == 0 and r["source"] == "doc"
        assert r["id"] == f"{r['doc_id']}#0"
    assert sum(r["text"].count("<|endoftext|>") for r in records) == 1
    assert by_id["doc/3"]["text"] in [r["text"] for r in whole]
    rows = sorted({i for r in records for i in r["rows"]})
    assert rows == list(range(len(inst)))


def test_a_selection_gives_document_pieces_joined_across_consecutive_rows(tok, tmp_path):
    inst, docs = _corpus(tmp_path, 16, tok)
    starts = np.asarray(inst.docs.starts)
    long_doc = int(np.argmax(np.diff(starts)))                  # a document over several rows
    first_row = int(starts[long_doc]) // 16 + 1                 # rows wholly inside it
    rows = [first_row, first_row + 1, first_row + 3]
    records = _export(inst, rows, tok, tmp_path)
    stream = np.asarray(inst.tokens).reshape(-1)
    texts = {d["id"]: d["text"] for d in docs}
    doc_id = docs[long_doc]["id"]
    pieces = [r for r in records if r["doc_id"] == doc_id]
    assert [p["rows"] for p in pieces] == [[first_row, first_row + 1], [first_row + 3]]   # joined, then a gap
    for p in pieces:
        assert not p["whole"] and p["end"] - p["start"] == 16 * len(p["rows"])
        assert p["text"] in texts[doc_id]                        # a piece of the document, whole characters
        a = int(starts[long_doc]) + p["start"]
        assert tok.decode(stream[a:a + p["end"] - p["start"]].tolist()).strip("\ufffd") == p["text"]
        assert p["scores"] == [float(r) for r in p["rows"]]


def test_cut_characters_are_left_out_and_subsets_read_through_their_parent(tok, tmp_path):
    """Rows cut mid-character (the Unicode document at seq_len 5) give whole characters only; a subset folder
    (refine's scored instances after dedup) exports the same text as the stream it points into."""
    inst, docs = _corpus(tmp_path, 5, tok)
    uni = next(d for d in docs if d["text"].startswith("Ünïcödé"))["text"]
    j = [d["id"] for d in docs].index("doc/11")
    lo, hi = int(inst.docs.starts[j]) // 5, int(inst.docs.starts[j + 1]) // 5
    rows = list(range(lo + 1, hi - 1, 2))                      # every other row: pieces with cut edges
    records = _export(inst, rows, tok, tmp_path)
    pieces = [r for r in records if r["doc_id"] == "doc/11"]
    assert len(pieces) == len(rows) and all("\ufffd" not in p["text"] and p["text"] in uni for p in pieces)
    sub = write_subset(inst, np.arange(lo, hi), tmp_path / "sub")
    again = _export(sub, [r - lo for r in rows], tok, tmp_path)
    assert [r["text"] for r in again] == [r["text"] for r in records]


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="no SmolLM2 tokenizer (make models)")
def test_smollm2_documents_hold_no_control_token_spelling(tmp_path):
    smol = load_tokenizer(SMOLLM2)
    inst, docs = _corpus(tmp_path, 64, smol)
    records = _export(inst, range(0, len(inst), 2), smol, tmp_path)
    texts = {d["id"]: d["text"] for d in docs}
    assert all(r["text"] in texts[r["doc_id"]] for r in records)
    assert sum(r["text"].count("<|endoftext|>") for r in records) <= 1     # only the document that says it
