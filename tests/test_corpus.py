"""Corpus readers: every format, deterministic order, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from refine.core.corpus import CorpusStats, Document, iter_documents
from refine.core.corpus import write_jsonl as write_jsonl_docs
from refine.core.errors import InputError
from refine.fetch.corpus import split_chapters, split_of
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
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                          "test": datasets.Dataset.from_dict({"text": texts[:3]})}).save_to_disk(str(tmp_path / "hfd"))
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(texts[:5]):
        (folder / f"{i:02d}.txt").write_text(t)
    (folder / ".hidden.txt").write_text("ignored")

    assert _texts(tmp_path / "c.jsonl") == texts
    assert _texts(tmp_path / "c.parquet", text_field="content") == texts
    assert _texts(tmp_path / "hf") == texts
    assert _texts(tmp_path / "hfd") == texts  # a DatasetDict defaults to its train split
    assert _texts(tmp_path / "hfd", split="test") == texts[:3]
    assert _texts(folder) == texts[:5]
    assert [d.id for d in iter_documents(tmp_path / "c.jsonl")] == [d["id"] for d in docs]
    assert [d.id for d in iter_documents(tmp_path / "c.parquet", text_field="content")] == [d["id"] for d in docs]
    assert [d.source for d in iter_documents(tmp_path / "c.jsonl")] == ["doc"] * 30


def test_single_text_file_is_one_document(tmp_path):
    (tmp_path / "notes.md").write_text("# Title\n\nSome prose.\n")
    assert list(iter_documents(tmp_path / "notes.md")) == [Document("notes", "# Title\n\nSome prose.\n", tmp_path.name)]


def test_default_ids_text_field_and_id_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.jsonl").write_text('{"body": "one", "key": "k1"}\n\n{"body": "three", "key": "k3"}\n')
    docs = list(iter_documents(tmp_path / "c.jsonl", text_field="body"))
    assert [(d.id, d.text, d.source) for d in docs] == [("c:1", "one", "c"), ("c:3", "three", "c")]
    assert [d.id for d in iter_documents(tmp_path / "c.jsonl", text_field="body", id_field="key")] == ["k1", "k3"]
    pq.write_table(pa.table({"text": ["a", "b"], "extra": [1, 2]}), tmp_path / "p.parquet")
    assert [d.id for d in iter_documents(tmp_path / "p.parquet")] == ["p:1", "p:2"]


def test_folder_mixes_formats_in_sorted_order(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("hidden folder, skipped")
    (root / "a.txt").write_text("plain a")
    (root / "b" / "c.jsonl").write_text('{"text": "json 1"}\n{"text": "json 2"}\n')
    (root / "b" / "deep" / "d.md").write_text("markdown d")
    pq.write_table(pa.table({"text": ["pq 1", "pq 2"]}), root / "b" / "e.parquet")
    datasets.Dataset.from_dict({"text": ["hf 1"]}).save_to_disk(str(root / "f_ds"))
    docs = list(iter_documents(root))
    assert [d.text for d in docs] == ["plain a", "json 1", "json 2", "markdown d", "pq 1", "pq 2", "hf 1"]
    assert [d.id for d in docs] == ["a", "b/c:1", "b/c:2", "b/deep/d", "b/e:1", "b/e:2", "f_ds:1"]
    assert docs == list(iter_documents(root))


def test_empty_documents_are_skipped_and_counted(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a b"}, {"text": "  \n"}, {"text": ""}, {"text": "c"}])
    stats = CorpusStats()
    assert _texts(tmp_path / "c.jsonl", stats=stats) == ["a b", "c"]
    assert stats.documents == 2 and stats.skipped_empty == 2 and stats.skipped_ids == ["c:2", "c:3"]


@pytest.mark.parametrize("content, match", [
    (b"", r"empty file: .*c\.jsonl"),
    (b"\n  \n", r"empty file: .*c\.jsonl \(no JSON lines\)"),
    (b'{"text": "ok"}\n{"text": "cut off', r"c\.jsonl:2: malformed JSON"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"c\.jsonl:2: not UTF-8 \(byte 0xe9 at byte offset 13 in the line\)"),
    (b'{"body": "no text field", "n": 1}\n', r"c\.jsonl:1: no field 'text' \(fields: body, n\)"),
    (b'{"text": 42}\n', r"c\.jsonl:1: field 'text' is int, not a string"),
    (b'{"text": ""}\n', "no non-empty documents"),
    (b'[1, 2]\n', r"c\.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl_is_one_clear_error(tmp_path, content, match):
    (tmp_path / "c.jsonl").write_bytes(content)
    with pytest.raises(InputError, match=match) as e:
        list(iter_documents(tmp_path / "c.jsonl"))
    assert "\n" not in str(e.value)


def test_bad_text_parquet_and_dataset_inputs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(InputError, match="corpus not found"):
        list(iter_documents(tmp_path / "nope.jsonl"))
    (tmp_path / "t.txt").write_bytes(b"line one\nline two caf\xe9\n")
    with pytest.raises(InputError, match=r"t\.txt:2: not UTF-8 \(byte 0xe9 at file byte offset 21\)"):
        list(iter_documents(tmp_path / "t.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty file: .*empty\.txt"):
        list(iter_documents(tmp_path / "empty.txt"))
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(InputError, match=r"blob\.bin: looks binary"):
        list(iter_documents(tmp_path / "blob.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files"):
        list(iter_documents(tmp_path / "empty"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"bad\.parquet: not a readable parquet"):
        list(iter_documents(tmp_path / "bad.parquet"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"p\.parquet: no field 'text' \(fields: body\)"):
        list(iter_documents(tmp_path / "p.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["x"]})}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(InputError, match=r"hf: no split 'validation' \(splits: train\)"):
        list(iter_documents(tmp_path / "hf", split="validation"))
    with pytest.raises(InputError, match=r"hf: no field 'text' \(fields: body\)"):
        list(iter_documents(tmp_path / "hf"))


def test_write_jsonl_round_trips(tmp_path):
    docs = [Document("a/1", "caf\u00e9 \"quoted\"\nline", "a"), Document("b/2", "two", "b")]
    assert write_jsonl_docs(iter(docs), tmp_path / "out" / "c.jsonl") == 2
    assert list(iter_documents(tmp_path / "out" / "c.jsonl")) == docs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.jsonl"]  # no temporary left behind


def test_split_is_deterministic_with_the_planned_fractions():
    ids = [f"doc/{i}" for i in range(10000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "val", "ref")}
    assert abs(frac["val"] - 0.02) < 0.005 and abs(frac["ref"] - 0.10) < 0.012 and set(splits) == set(frac)
    assert split_of("wiki/Jane Austen") == split_of("wiki/Jane Austen")


def test_novel_lines_become_chapters_of_paragraphs():
    lines = ["EMMA", "", "By Jane Austen", "", "", "CHAPTER I", "", "Emma Woodhouse, handsome,", "clever, and rich.",
             "", "She was the youngest.", "", "", "CHAPTER II", "", "Mr. Weston was a native."]
    docs = split_chapters("emma", lines)
    assert [d.id for d in docs] == ["austen/emma/000", "austen/emma/001", "austen/emma/002"]
    assert docs[0].text == "EMMA\n\nBy Jane Austen"
    assert docs[1].text == "CHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich.\n\nShe was the youngest."
    assert {d.source for d in docs} == {"austen"}
    assert [d.id for d in split_chapters("p", ["Chapter 1", "x", "Chapterhouse", "Chapter 2", "y"])] == [
        "austen/p/001", "austen/p/002"]


@pytest.mark.parametrize("write, match", [
    (None, "corpus not found"),
    (b"", "empty file"),
    (b'{"text": "caf\xe9 au lait"}\n', "not UTF-8"),
])
@pytest.mark.integration
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
def test_real_corpus_fetch(tmp_path, capsys):
    """Downloads both packages from the registries into a fresh folder and builds the corpus."""
    from refine.fetch.corpus import fetch

    manifest = fetch(tmp_path / "out", dl=tmp_path / "dl")
    counts = manifest["counts"]
    assert 9500 < counts["all"]["wiki_docs"] <= 10033 and counts["all"]["austen_docs"] == 275
    assert sum(counts[s]["wiki_docs"] + counts[s]["austen_docs"] for s in ("train", "val", "ref")) == \
        manifest["documents"]
    chapters = Counter(d.id.split("/")[1] for d in iter_documents(tmp_path / "out" / "corpus.jsonl")
                       if d.source == "austen")
    # title page + chapters: Emma 55, Mansfield Park 48, Northanger Abbey 31, Persuasion 24, P&P 61, S&S 50
    assert chapters == {"emma": 56, "mansfieldpark": 49, "northangerabbey": 32, "persuasion": 25,
                        "prideprejudice": 62, "sensesensibility": 51}
    first = json.loads((tmp_path / "out" / "corpus.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "source", "text"} and first["id"].startswith("wiki/")
    for split in ("train", "val", "ref"):
        assert all(split_of(d.id) == split for d in iter_documents(tmp_path / "out" / f"{split}.jsonl"))
    capsys.readouterr()
    fetch(tmp_path / "out", dl=tmp_path / "dl")
    assert "corpus up to date" in capsys.readouterr().out


def test_links_inside_a_corpus_folder_are_not_followed(tmp_path):
    """A link to a system file, a ``..`` link and two links to ``.`` are skipped and counted; the corpus is read
    once, and the fingerprint (the cache key) covers exactly the files read: adding links does not change it."""
    import os

    from refine.core.pack import corpus_fingerprint

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("real document")
    before = corpus_fingerprint(root)
    os.symlink("/etc/hostname", root / "system.txt")
    os.symlink("..", root / "up")
    os.symlink(".", root / "self1")
    os.symlink(".", root / "self2")
    stats = CorpusStats()
    docs = list(iter_documents(root, stats=stats))
    assert [d.text for d in docs] == ["real document"] and stats.skipped_links == 4
    assert corpus_fingerprint(root) == before


def test_a_hub_cache_dataset_snapshot_is_read_through_its_blob_links(tmp_path):
    """huggingface_hub keeps a dataset as ``snapshots/<rev>/<path>`` links into ``blobs/``: the snapshot folder
    (or a glob in it) reads those files under their own names; a link out of the repo's blobs is still skipped."""
    import os

    repo = tmp_path / "hub" / "datasets--org--corpus"
    (repo / "blobs").mkdir(parents=True)
    data = repo / "snapshots" / "0123abcd" / "data"
    data.mkdir(parents=True)
    for i, sha in enumerate(("9f1c", "b27e")):
        (repo / "blobs" / sha).write_bytes(_compress(f'{{"text": "shard {i} document"}}\n'.encode(), ".gz"))
        os.symlink(f"../../../blobs/{sha}", data / f"train-{i:05d}.jsonl.gz")
    os.symlink("/etc/hostname", data / "system.txt")
    for path in (data.parent, f"{data}/*.jsonl.gz"):
        stats = CorpusStats()
        docs = list(iter_documents(path, stats=stats))
        assert [d.text for d in docs] == ["shard 0 document", "shard 1 document"]
        assert docs[0].id.endswith("train-00000:1") and stats.skipped_links == (path == data.parent)


def test_documents_over_max_doc_bytes_are_skipped_and_counted(tmp_path):
    big = "x" * 5000
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "small", "text": "fine"}) + "\n" + json.dumps({"id": "big", "text": big})
                      + "\n" + json.dumps({"id": "last", "text": "also fine"}) + "\n")
    stats = CorpusStats()
    docs = list(iter_documents(corpus, stats=stats, max_doc_bytes=1000))
    assert [d.id for d in docs] == ["small", "last"] and stats.skipped_too_large == 1
    assert stats.too_large_ids == ["c:2"]
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "big.txt").write_text(big)
    (folder / "small.txt").write_text("short")
    stats = CorpusStats()
    assert [d.id for d in iter_documents(folder, stats=stats, max_doc_bytes=1000)] == ["small"]
    assert stats.skipped_too_large == 1 and stats.too_large_ids == ["big"]
    with pytest.raises(InputError, match="1 over 1000 bytes skipped"):
        list(iter_documents(folder / "big.txt", max_doc_bytes=1000))


def test_a_deeply_nested_json_line_is_one_line(tmp_path):
    corpus = tmp_path / "nested.jsonl"
    corpus.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(InputError, match=r"nested\.jsonl:1: JSON nested too deeply") as e:
        list(iter_documents(corpus))
    assert "\n" not in str(e.value)


# ---- corpora as they ship: compressed JSONL, shards in folders and globs (issue 14) ---------------------------

def _compress(data: bytes, suffix: str) -> bytes:
    import bz2
    import gzip
    import lzma

    import zstandard

    if suffix == ".zst":                                 # two frames: shards are often written frame by frame
        half = len(data) // 2
        return zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:])
    return {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix](data)


@pytest.mark.parametrize("name", ["c.jsonl.gz", "c.json.zst", "c.jsonl.zstd", "c.jsonl.bz2", "c.ndjson.xz"])
def test_compressed_jsonl_reads_as_the_plain_file(tmp_path, name):
    docs = make_docs(40, seed=9)
    (tmp_path / "plain").mkdir()
    plain = write_jsonl(tmp_path / "plain" / "c.jsonl", docs)
    suffix = "." + name.rsplit(".", 1)[1].replace("zstd", "zst")
    (tmp_path / name).write_bytes(_compress(plain.read_bytes(), suffix))
    assert list(iter_documents(tmp_path / name)) == list(iter_documents(plain))
    assert [d.id for d in iter_documents(tmp_path / name)] == [d["id"] for d in docs]
    # default ids and sources drop both suffixes: c:1, source c
    (tmp_path / "bare.jsonl.gz").write_bytes(_compress(b'{"text": "x y"}\n', ".gz"))
    assert list(iter_documents(tmp_path / "bare.jsonl.gz")) == [Document("bare:1", "x y", "bare")]


def test_a_glob_or_folder_of_shards_reads_in_sorted_order(tmp_path):
    from refine.core.pack import corpus_fingerprint

    shards = tmp_path / "fineweb"
    (shards / "sub").mkdir(parents=True)
    docs = make_docs(30, seed=5)
    for i, suffix in enumerate([".gz", ".zst", ".bz2"]):
        data = "".join(json.dumps({"text": d["text"]}) + "\n" for d in docs[i * 10:(i + 1) * 10]).encode()
        (shards / ("sub" if i == 2 else "") / f"{i:03d}.jsonl{suffix}").write_bytes(_compress(data, suffix))
    (shards / "README.md").write_text("not a shard")
    pattern = f"{shards}/**/*.jsonl.*"
    got = list(iter_documents(pattern))
    assert [d.text for d in got] == [d["text"] for d in docs]
    assert [d.id for d in got[9:11]] == ["000:10", "001:1"] and got[-1].id == "sub/002:10"
    assert [d.id for d in iter_documents(shards)][-1] == "sub/002:10"   # the folder: the same names, + README
    # the cache key covers exactly the matched files: a file outside the pattern does not change it, a shard does
    key = corpus_fingerprint(pattern)
    (shards / "README.md").write_text("changed, not read")
    assert corpus_fingerprint(pattern) == key != corpus_fingerprint(shards)
    (shards / "000.jsonl.gz").write_bytes(_compress(b'{"text": "other"}\n', ".gz"))
    assert corpus_fingerprint(pattern) != key
    with pytest.raises(InputError, match=r"no corpus files match .*\*\.parquet"):
        list(iter_documents(f"{shards}/*.parquet"))
    # links under a pattern are skipped and counted as in a folder; ``**`` does not follow a ``..`` loop
    import os

    os.symlink("/etc/hostname", shards / "system.jsonl.gz")
    os.symlink("..", shards / "sub" / "up")
    stats = CorpusStats()
    assert [d.id for d in iter_documents(f"{shards}/**/*", stats=stats)][-1] == "sub/002:10"
    assert stats.skipped_links == 2 and corpus_fingerprint(pattern) != key


@pytest.mark.parametrize("suffix, damage", [(".gz", "truncate"), (".gz", "not gzip"), (".zst", "truncate"),
                                            (".bz2", "truncate"), (".xz", "truncate")])
def test_a_corrupt_or_truncated_compressed_shard_is_one_line(tmp_path, suffix, damage):
    data = _compress("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(300)).encode(),
                     suffix)
    bad = data[: len(data) * 2 // 3] if damage == "truncate" else b'{"text": "plain JSON named .gz"}\n'
    (tmp_path / f"s{suffix}").mkdir()
    shard = tmp_path / f"s{suffix}" / f"0001.jsonl{suffix}"
    shard.write_bytes(bad)
    with pytest.raises(InputError, match=rf"0001\.jsonl\{suffix}: corrupt or truncated \w+ data near compressed "
                                         rf"byte \d+ of {len(bad)}") as e:
        list(iter_documents(tmp_path / f"s{suffix}"))
    assert "\n" not in str(e.value)


def test_compressed_lines_keep_the_size_limit(tmp_path):
    """A line over max_doc_bytes inside a compressed shard is skipped in bounded pieces, as in a plain file."""
    rows = [{"id": "small", "text": "fine"}, {"id": "big", "text": "x" * 50_000}, {"id": "last", "text": "ok"}]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(_compress(data, ".zst"))
    (tmp_path / "t.txt.gz").write_bytes(_compress(b"y" * 5000, ".gz"))
    stats = CorpusStats()
    assert [d.id for d in iter_documents(tmp_path, stats=stats, max_doc_bytes=1000)] == ["small", "last"]
    assert stats.skipped_too_large == 2 and stats.too_large_ids == ["c:2", "t"]
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"x\.parquet\.gz: parquet compresses inside the file"):
        list(iter_documents(tmp_path / "x.parquet.gz"))
