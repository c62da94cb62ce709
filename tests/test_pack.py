"""Tokenize + pack round trip, reuse of finished packings, and clear errors on damaged or foreign data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from distill.data import BatchStream, open_instances
from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.pack import pack
from refine.core.tokenizer import load_tokenizer
from tests.conftest import REPO, make_docs, write_jsonl


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


# ---- the on-disk document index, version 1 folders, packing over processes (issue 14) --------------------------

def to_version_1(folder, docs: list[dict]) -> None:
    """Turn a packed folder into what version 1 wrote: one docs.json list instead of the document arrays."""
    index = json.loads((folder / "index.json").read_text())
    for name in ("doc_starts.bin", "doc_ids.bin", "doc_id_offsets.bin", "doc_sources.bin", "doc_sources.json"):
        (folder / name).unlink()
    (folder / "docs.json").write_text(json.dumps(docs, ensure_ascii=False))
    (folder / "index.json").write_text(json.dumps({**index, "version": 1}, indent=2))


def test_document_index_is_arrays_and_version_1_folders_still_read(tok, tiny_corpus, tmp_path):
    import bisect
    import shutil

    inst = pack(tiny_corpus / "train.jsonl", tok, 32, tmp_path / "p", quiet=True)
    assert not (tmp_path / "p" / "docs.json").exists() and inst.index["version"] == 2
    docs = [json.loads(line) for line in (tiny_corpus / "train.jsonl").read_text().splitlines()]
    records = [inst.docs.record(j) for j in range(len(inst.docs))]
    assert [r["id"] for r in records] == [d["id"] for d in docs] and len(records) == inst.index["documents"]
    assert [r["len"] for r in records] == [len(tok(d["text"], add_special_tokens=False)["input_ids"]) + 1
                                           for d in docs]
    assert records[0]["start"] == 0 and all(a["start"] + a["len"] == b["start"] for a, b in zip(records, records[1:]))
    # doc_ids: the binary search over the mapped starts answers as a scan of the records does
    starts = [r["start"] for r in records]
    expected = []
    for i in range(len(inst)):
        first, last = bisect.bisect_right(starts, i * 32) - 1, bisect.bisect_left(starts, (i + 1) * 32) - 1
        expected.append([records[j]["id"] for j in range(max(first, 0), last + 1)])
    assert [inst.doc_ids(i) for i in range(len(inst))] == expected
    # the same folder as version 1 wrote it (docs.json): the same answers, tokens.bin untouched
    shutil.copytree(tmp_path / "p", tmp_path / "v1")
    to_version_1(tmp_path / "v1", records)
    old = Instances(tmp_path / "v1")
    assert old.index["tokens_sha256"] == inst.index["tokens_sha256"]
    assert [old.doc_ids(i) for i in range(len(old))] == expected
    assert [old.source_of(i) for i in range(len(old))] == [inst.source_of(i) for i in range(len(inst))] == \
        ["doc"] * len(inst)


def test_subset_sources_through_the_chain(tok, tmp_path):
    from refine.core.instances import write_subset

    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", make_docs(60, seed=1, prefix="wiki"))
    write_jsonl(corpus / "b.jsonl", make_docs(60, seed=2, prefix="novel"))
    inst = pack(corpus, tok, 32, tmp_path / "p", quiet=True)
    sources = [inst.source_of(i) for i in range(len(inst))]
    assert sources[0] == "wiki" and sources[-1] == "novel" and "mixed" in sources
    rows = np.array([len(inst) - 1, 0, 3])
    sub = write_subset(inst, rows, tmp_path / "sub")
    subsub = write_subset(sub, np.array([2, 0]), tmp_path / "subsub")
    root, root_rows = subsub.root_rows(within=tmp_path)
    assert root.folder == inst.folder and root_rows.tolist() == [3, len(inst) - 1]
    assert [subsub.source_of(i) for i in range(2)] == [sources[3], "novel"]
    with pytest.raises(InputError, match="is a subset"):
        _ = sub.docs


def test_damaged_document_index_is_one_line(tok, tiny_corpus, tmp_path):
    folder = tmp_path / "p"
    pack(tiny_corpus / "val.jsonl", tok, 16, folder, quiet=True)
    starts = np.fromfile(folder / "doc_starts.bin", dtype="<i8")
    for damage, match in ((lambda: starts[:-1].tofile(folder / "doc_starts.bin"), "doc_starts.bin: truncated"),
                          (lambda: np.where(np.arange(len(starts)) == 3, 0, starts).astype("<i8").tofile(
                              folder / "doc_starts.bin"), "document starts are not increasing from 0"),
                          (lambda: (folder / "doc_ids.bin").write_bytes(b"x"), "doc_id_offsets.bin: ends at"),
                          (lambda: (folder / "doc_sources.json").write_text("[]"), r"doc_sources.bin: source 0 of 0")):
        pack(tiny_corpus / "val.jsonl", tok, 16, tmp_path / "fresh", quiet=True)
        for name in ("doc_starts.bin", "doc_ids.bin", "doc_sources.json"):
            (folder / name).write_bytes((tmp_path / "fresh" / name).read_bytes())
        damage()
        with pytest.raises(InputError, match=match) as e:
            Instances(folder).doc_ids(0)
        assert "\n" not in str(e.value)


def test_workers_give_byte_identical_output(tok, tmp_path):
    """Packing a glob of compressed shards in 2 processes writes the same bytes, file by file, as 1 process."""
    import gzip

    import zstandard

    shards = tmp_path / "shards"
    shards.mkdir()
    docs = make_docs(1500, seed=11)                      # several batches of BATCH_DOCS, so order matters
    for i in range(3):
        data = "".join(json.dumps(d) + "\n" for d in docs[i * 500:(i + 1) * 500]).encode()
        if i == 1:
            (shards / f"{i:03d}.json.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        else:
            (shards / f"{i:03d}.jsonl.gz").write_bytes(gzip.compress(data))
    one = pack(f"{shards}/*.json*", tok, 64, tmp_path / "w1", quiet=True, workers=1)
    two = pack(f"{shards}/*.json*", tok, 64, tmp_path / "w2", quiet=True, workers=2)
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir()) and "tokens.bin" in files
    for name in files:
        a, b = (tmp_path / "w1" / name).read_bytes(), (tmp_path / "w2" / name).read_bytes()
        if name == "manifest.json":                      # provenance: when it was written, how long it took
            a, b = ({k: v for k, v in json.loads(x).items() if k not in ("written_at", "seconds")} for x in (a, b))
        assert a == b, name
    assert one.index["documents"] == 1500 and two.doc_ids(len(two) - 1)[-1] == docs[-1]["id"]


def test_skipped_counts_are_reported_in_the_warning_and_the_manifest(tok, tmp_path, capsys):
    """Every document or file the corpus reader skips is counted where packing reports skips: the terminal warning
    and ``manifest.json``: over-size documents, links and FIFOs/devices/sockets alike."""
    outside = write_jsonl(tmp_path / "outside.jsonl", [{"text": "not part of the corpus"}])
    root = tmp_path / "c"
    root.mkdir()
    write_jsonl(root / "a.jsonl", make_docs(40, seed=3) + [{"text": "word " * 1000}])
    (root / "b.jsonl").symlink_to(outside)
    os.mkfifo(root / "pipe.jsonl")                      # skipped, never opened (tests/test_read_guard.py)
    pack(root, tok, 32, tmp_path / "p", max_doc_bytes=2000)
    warning = capsys.readouterr().out.splitlines()[0]
    assert warning == (f"warning: {root}: 1 documents over 2000 bytes, 1 links and 1 FIFOs, devices or sockets "
                       f"skipped (first: a:41)")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert (manifest["skipped_too_large"], manifest["too_large_ids"], manifest["skipped_links"],
            manifest["skipped_special"]) == (1, ["a:41"], 1, 1)

    (root / "b.jsonl").unlink()                         # a FIFO alone is reported too
    write_jsonl(root / "a.jsonl", make_docs(40, seed=3))
    pack(root, tok, 32, tmp_path / "q")
    assert f"warning: {root}: 0 documents over {64 << 20} bytes, 0 links and 1 FIFOs, devices or sockets skipped " \
           f"(first: -)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["skipped_special"] == 1 and "skipped_links" not in manifest and "skipped_too_large" not in manifest


SPECIAL_DOC = "A tokenizer ends a document with <|endoftext|> and opens a chat turn with <|im_start|>user."
SMOLLM2 = REPO / ".cache" / "models" / "smollm2-135m"


def _pack_special(tok, tmp_path) -> tuple[list[int], list[int]]:
    """The packed ids of SPECIAL_DOC and of the document after it (each without the EOS packing adds)."""
    corpus = write_jsonl(tmp_path / "special.jsonl", [{"id": "s/0", "text": SPECIAL_DOC},
                                                      {"id": "s/1", "text": "Second document."}])
    inst = pack(corpus, tok, 2, tmp_path / "p", quiet=True)
    stream = np.asarray(inst.tokens).reshape(-1).tolist()
    second = int(inst.docs.starts[1])
    eos = tok.eos_token_id
    # the EOS packing puts after each document is a real EOS, and it is the only one: no false boundary
    at = [i for i, t in enumerate(stream) if t == eos]
    assert stream[second - 1] == eos and at in ([second - 1], [second - 1, len(stream) - 1])
    return stream[:second - 1], stream[second:second + len(tok("Second document.")["input_ids"])]


def test_special_token_strings_in_the_text_are_packed_as_text(tok, tmp_path):
    """A document that mentions ``<|endoftext|>`` or another special token's string is packed as those characters:
    no EOS id in its middle, no control id (the tiny tokenizer, with ``<|im_start|>`` added as a special token)."""
    tok.add_tokens(["<|im_start|>"], special_tokens=True)
    control = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_start|>")}
    ids, second = _pack_special(tok, tmp_path)
    assert not control & set(ids) and tok.decode(ids) == SPECIAL_DOC
    assert second == tok("Second document.", add_special_tokens=False)["input_ids"]     # plain text: as before


def test_a_packing_from_before_special_strings_were_text_is_packed_again(tok, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "s/0", "text": SPECIAL_DOC * 8}])
    pack(corpus, tok, 8, tmp_path / "p", quiet=True)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    manifest["key"].pop("special_strings")                     # the key a packing had before
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "p" / "tokens.bin").write_bytes(b"\0" * (tmp_path / "p" / "tokens.bin").stat().st_size)
    inst = pack(corpus, tok, 8, tmp_path / "p", quiet=True)
    assert tok.eos_token_id not in np.asarray(inst.tokens).reshape(-1)[:-8].tolist()


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file(), reason="no SmolLM2 tokenizer (make models)")
def test_special_token_strings_are_text_with_the_smollm2_tokenizer(tmp_path):
    """SmolLM2 reads ``<|endoftext|>`` as EOS (id 0) and ``<|im_start|>`` as id 1 when it parses special tokens;
    packed corpus text holds neither."""
    smol = load_tokenizer(SMOLLM2)
    ids, second = _pack_special(smol, tmp_path)
    # was [49, 46119, 6947, 253, 3140, 351, 216, 0, 284, 10573, 253, 11743, 1607, 351, 216, 1, 4093, 30]
    assert ids == [49, 46119, 6947, 253, 3140, 351, 2067, 108, 486, 1714, 2692, 108, 46, 284, 10573, 253, 11743,
                   1607, 351, 2067, 108, 306, 79, 3738, 108, 46, 4093, 30]
    assert smol.decode(ids) == SPECIAL_DOC and not {0, 1, 2} & set(ids)
    assert second == smol("Second document.", add_special_tokens=False)["input_ids"]
