"""Corpus readers: every format, deterministic order, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from refine.corpus import CorpusStats, iter_documents
from refine.errors import InputError
from refine.fetch_corpus import split_of
from tests.conftest import REPO, make_docs, write_jsonl


def _texts(path, **kw):
    return [d.text for d in iter_documents(path, **kw)]


def test_jsonl_parquet_text_folder_and_hf_dataset_agree(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(30, seed=0)
    texts = [d["text"] for d in docs]
    write_jsonl(tmp_path / "c.jsonl", docs)
    pq.write_table(pa.table({"content": texts, "id": [d["id"] for d in docs]}), tmp_path / "c.parquet",
                   row_group_size=7)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "hfd"))
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(texts[:5]):
        (folder / f"{i:02d}.txt").write_text(t)
    (folder / ".hidden.txt").write_text("ignored")

    assert _texts(tmp_path / "c.jsonl") == texts
    assert _texts(tmp_path / "c.parquet", text_field="content") == texts
    assert _texts(tmp_path / "hf") == texts
    assert _texts(tmp_path / "hfd", split="train") == texts
    assert _texts(folder) == texts[:5]
    ids = [d.id for d in iter_documents(tmp_path / "c.jsonl")]
    assert ids == [d["id"] for d in docs]


def test_empty_documents_are_skipped_and_counted(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a b"}, {"text": "  \n"}, {"text": ""}, {"text": "c"}])
    stats = CorpusStats()
    assert _texts(tmp_path / "c.jsonl", stats=stats) == ["a b", "c"]
    assert stats.documents == 2 and stats.skipped_empty == 2


@pytest.mark.parametrize("content, match", [
    (b"", "empty file"),
    (b'{"text": "ok"}\n{"text": "cut off', r"c\.jsonl:2: malformed JSON"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"c\.jsonl:2: not UTF-8 \(byte 0xe9"),
    (b'{"body": "no text field"}\n', r"c\.jsonl:1: no field 'text' \(fields: body\)"),
    (b'{"text": 42}\n', "is int, not a string"),
    (b'{"text": ""}\n', "no non-empty documents"),
    (b'[1, 2]\n', "expected a JSON object"),
])
def test_bad_jsonl_is_one_clear_error(tmp_path, content, match):
    (tmp_path / "c.jsonl").write_bytes(content)
    with pytest.raises(InputError, match=match) as e:
        list(iter_documents(tmp_path / "c.jsonl"))
    assert "\n" not in str(e.value)


def test_missing_binary_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="corpus not found"):
        list(iter_documents(tmp_path / "nope.jsonl"))
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(InputError, match="looks binary"):
        list(iter_documents(tmp_path / "blob.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files"):
        list(iter_documents(tmp_path / "empty"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable parquet"):
        list(iter_documents(tmp_path / "bad.parquet"))


def test_split_is_deterministic_with_the_planned_fractions():
    ids = [f"doc/{i}" for i in range(20000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "val", "ref")}
    assert abs(frac["val"] - 0.02) < 0.005 and abs(frac["ref"] - 0.10) < 0.01


@pytest.mark.parametrize("write, match", [
    (None, "corpus not found"),
    (b"", "empty file"),
    (b'{"text": "caf\xe9 au lait"}\n', "not UTF-8"),
])
def test_trainer_cli_bad_corpus_is_one_line(tmp_path, tiny_tokenizer_dir, tiny_corpus, write, match):
    bad = tmp_path / "bad.jsonl"
    if write is not None:
        bad.write_bytes(write)
    res = subprocess.run([sys.executable, "-m", "distill.train", "+experiment=lm_baseline", "+debug=tiny",
                          f"model.tokenizer={tiny_tokenizer_dir}", f"paths.corpus={tiny_corpus}",
                          f"data.train={bad}", f"paths.cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], res.stderr


@pytest.mark.slow
def test_real_corpus_fetch(tmp_path):
    from refine.fetch_corpus import fetch

    manifest = fetch(tmp_path)
    counts = manifest["counts"]
    wiki = sum(c["wiki_docs"] for c in counts.values())
    austen = sum(c["austen_docs"] for c in counts.values())
    assert 9000 < wiki < 11000 and 250 < austen < 400
    first = json.loads((tmp_path / "corpus.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "source", "text"}
