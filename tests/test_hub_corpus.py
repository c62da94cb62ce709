"""Hub datasets as corpora (``hf://datasets/ORG/NAME[@REV]/PATTERN``), read offline from a
hub-layout dataset cache built here as huggingface_hub lays a download out (refs -> commit,
snapshots/<commit>/ links -> blobs/)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from refine.core.corpus import CorpusStats, corpus_units, iter_documents
from refine.core.corpus_formats import jsonl_rows, parquet_rows
from refine.core.errors import InputError
from refine.core.hub_corpus import HubFile
from refine.core.pack import corpus_fingerprint
from refine.folder_key import scoring_settings
from tests.conftest import HUB_COMMIT, make_docs, offline_hub_repo

MAIN = HUB_COMMIT
V1 = "fedcba9876543210fedcba9876543210fedcba98"


def _parquet(docs: list[dict], row_group_size: int = 64) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(docs), buf, row_group_size=row_group_size)
    return buf.getvalue()


def _jsonl(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


def _put(repo: Path, commit: str, rel: str, data: bytes) -> None:
    """``snapshots/<commit>/<rel>``: a relative link to ``blobs/<sha256>``, as huggingface_hub's."""
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


# what the repo's main holds, path -> bytes (a local copy of these is the reference reading)
def _main_files() -> dict[str, bytes]:
    no_ids = [{"text": d["text"]} for d in make_docs(30, seed=7)]
    return {"data/train-00000.parquet": _parquet(make_docs(200, seed=5, prefix="pq")),
            "data/train-00001.jsonl.gz": gzip.compress(_jsonl(make_docs(150, seed=6, prefix="js"))),
            "data/extra/notes.jsonl": _jsonl(no_ids),
            "README.md": b"# acme/web\nA dataset card, not a document.\n",
            ".gitattributes": b"*.parquet filter=lfs\n"}


@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    """``HF_HOME`` holding the dataset ``acme/web``: ``main`` and the tag ``v1`` (another commit);
    the hub offline."""
    repo = offline_hub_repo(tmp_path, monkeypatch, "acme--web", kind="datasets", refs={"main": MAIN, "v1": V1})
    for rel, data in _main_files().items():
        _put(repo, MAIN, rel, data)
    _put(repo, V1, "data/old.jsonl", _jsonl(make_docs(40, seed=8, prefix="old")))
    return repo


def _local_copy(tmp_path: Path, files: dict[str, bytes]) -> Path:
    out = tmp_path / "local"
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return out


def _docs(path) -> list[tuple[str, str, str]]:
    return [(d.id, d.source, d.text) for d in iter_documents(path)]


def test_an_hf_corpus_reads_offline_as_its_local_copy_would(hub_home, tmp_path):
    files = _main_files()
    local = _local_copy(tmp_path, {k: v for k, v in files.items() if k.startswith("data/")})
    whole = _docs("hf://datasets/acme/web")          # README.md and .gitattributes are no shards
    assert whole == _docs(local) == _docs("hf://datasets/acme/web@main/")
    assert len(whole) == 380
    assert any(i.startswith("data/extra/notes:") for i, _, _ in whole)     # named as locally
    assert _docs("hf://datasets/acme/web/data") == _docs(local / "data")
    assert _docs("hf://datasets/acme/web/data/*.parquet") == _docs(local / "data" / "*.parquet")
    assert _docs("hf://datasets/acme/web/**/*.jsonl*") == _docs(f"{local}/**/*.jsonl*")
    assert _docs("hf://datasets/acme/web/data/extra/notes.jsonl")[0][0] == "notes:1"  # its stem
    # a revision: a tag of the cache's refs, or the commit itself
    old = _docs("hf://datasets/acme/web@v1/data")
    assert len(old) == 40 and old == _docs(f"hf://datasets/acme/web@{V1}") and old[0][0] == "old/0"
    stats = CorpusStats()
    units = corpus_units("hf://datasets/acme/web/data", stats)
    assert [name for _, name in units] == ["extra/notes", "train-00000", "train-00001"]
    assert all(MAIN in u.parts and u.is_symlink() for u, _ in units)   # the cache's snapshot links
    assert stats.skipped_links == 0


def test_the_fingerprint_is_the_commit_and_file_list(hub_home):
    main = corpus_fingerprint("hf://datasets/acme/web/data")
    assert main == corpus_fingerprint("hf://datasets/acme/web@main/data/")
    assert main == corpus_fingerprint(f"hf://datasets/acme/web@{MAIN}/data")
    assert main != corpus_fingerprint("hf://datasets/acme/web/data/*.parquet")   # other files
    v1 = corpus_fingerprint("hf://datasets/acme/web@v1")
    assert v1 != corpus_fingerprint("hf://datasets/acme/web")
    # main moves to a new commit holding the same bytes: another corpus version, packed again
    snapshots = hub_home / "snapshots"
    shutil.copytree(snapshots / MAIN, snapshots / ("1" * 40), symlinks=True)
    (hub_home / "refs" / "main").write_text("1" * 40)
    assert corpus_fingerprint("hf://datasets/acme/web/data") != main
    # no shard is read for it: a blob gone bad is found when it is read, not by the fingerprint
    for blob in (hub_home / "blobs").iterdir():
        blob.write_bytes(b"\x00" * blob.stat().st_size)
    assert corpus_fingerprint("hf://datasets/acme/web@v1") == v1
    with pytest.raises(InputError):
        _docs("hf://datasets/acme/web@v1")
    # the refine folder's record names the corpus as given (not as a local path)
    settings = scoring_settings({"corpus": "hf://datasets/acme/web@v1/data"})
    assert settings["corpus"] == "hf://datasets/acme/web@v1/data"


@pytest.mark.parametrize("url, message", [
    ("hf://datasets/acme/web/data/missing.parquet",
     r"no parquet or JSON-lines shard of acme/web at main \(0123456789ab\) matches "
     r"'data/missing.parquet' in "
     r"the hub cache .*hf download acme/web --repo-type dataset --include 'data/missing.parquet'"),
    ("hf://datasets/acme/web/README.md", r"no parquet or JSON-lines shard .* matches 'README.md'"),
    ("hf://datasets/acme/web@v9/data",
     r"revision 'v9' of acme/web is not in the hub cache .*\(cached: main, v1\), and the hub is "
     r"offline here .*--revision v9"),
    ("hf://datasets/acme/other", r"acme/other is not in the hub cache .*hf download acme/other"),
    ("hf://models/acme/web/data", r"not a hub corpus address; one is hf://datasets/ORG/NAME"),
    ("hf://datasets/acme", r"not a hub corpus address"),
    ("hf://datasets/acme/web@..%2F..%2Fx/data", r"'../../x' is not a hub revision"),
    ("hf://datasets/acme/web/../models--x", r"steps out of the repo"),
])
def test_what_is_not_there_is_one_line(hub_home, url, message):
    with pytest.raises(InputError, match=message) as e:
        _docs(url)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_the_cache_cannot_send_a_read_outside_its_blobs(hub_home, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "a private key"}\n')
    snap = hub_home / "snapshots" / MAIN
    (snap / "data" / "planted.jsonl").symlink_to(secret)       # a link out of the cache
    os.mkfifo(snap / "data" / "pipe.jsonl")                    # an open that never returns
    (snap / "linked").symlink_to(tmp_path)                     # a linked folder
    stats = CorpusStats()
    docs = list(iter_documents("hf://datasets/acme/web", stats=stats))
    assert len(docs) == 380 and not any("private" in d.text for d in docs)
    assert (stats.skipped_links, stats.skipped_special) == (1, 1)   # (the folder names no shard)
    with pytest.raises(InputError, match=r"matches 'data/planted.jsonl' .*\(1 links, FIFOs or "
                                         r"devices skipped\)"):
        _docs("hf://datasets/acme/web/data/planted.jsonl")
    # a ref naming no commit, a snapshot that is a link: one line each, nothing read
    (hub_home / "refs" / "evil").write_text("../../../secret")
    with pytest.raises(InputError, match=r"refs/evil: not a commit hash"):
        _docs("hf://datasets/acme/web@evil")
    (hub_home / "snapshots" / ("2" * 40)).symlink_to(tmp_path)
    (hub_home / "refs" / "linked").write_text("2" * 40)
    with pytest.raises(InputError, match=r"snapshot .* is not a folder inside"):
        _docs("hf://datasets/acme/web@linked")


def test_an_unreachable_hub_falls_back_to_the_cache(hub_home, monkeypatch, capsys):
    """Online (HF_HUB_OFFLINE=0) where huggingface_hub cannot connect (here its own offline switch,
    read when it was imported, refuses every request): the cache's snapshot is read, with a note."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert len(_docs("hf://datasets/acme/web@v1")) == 40
    assert "the hub cannot be reached" in capsys.readouterr().err
    with pytest.raises(InputError,
                       match=r"acme/other is not in the hub cache .*the hub cannot be reached"):
        _docs("hf://datasets/acme/other")


class _RangeFile(AbstractBufferedFile):
    """The fsspec file class huggingface_hub's own subclasses (``HfFileSystemFile``): blocks fetched
    by byte range, here from a local file instead of an HTTP range request; records the largest."""

    largest = 0

    def _fetch_range(self, start: int, end: int) -> bytes:
        _RangeFile.largest = max(_RangeFile.largest, end - start)
        with open(self.path, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)


class _RangeFS(AbstractFileSystem):
    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return _RangeFile(self, path, mode, block_size=16 << 10, size=os.path.getsize(path))


def test_a_streamed_shard_reads_as_the_file_and_in_blocks(tmp_path):
    """A shard on the hub is read through its file system's block reads (``HubFile``), row for row
    as the same file on disk, and never fetched whole."""
    docs = make_docs(6000, seed=9)
    files = {"a.parquet": _parquet(docs, row_group_size=500), "b.jsonl": _jsonl(docs),
             "c.jsonl.gz": gzip.compress(_jsonl(docs))}
    fs = _RangeFS()
    for name, data in files.items():
        f = tmp_path / name
        f.write_bytes(data)
        remote = HubFile(fs, str(f), len(data), f"hf://datasets/acme/web@{MAIN}/{name}")
        read = (lambda u: parquet_rows(u, "text", None, 1 << 20)) if name.endswith("parquet") else \
            (lambda u: jsonl_rows(u, 1 << 20))
        _RangeFile.largest = 0
        assert list(read(remote)) == list(read(f))
        assert 0 < _RangeFile.largest < len(data) // 2, name      # a row group, a buffer: not all
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(files["c.jsonl.gz"][:-100])
    with pytest.raises(InputError,
                       match=rf"hf://datasets/acme/web@{MAIN}/cut.jsonl.gz: corrupt or truncated"):
        list(jsonl_rows(HubFile(fs, str(truncated), truncated.stat().st_size,
                                f"hf://datasets/acme/web@{MAIN}/cut.jsonl.gz"), 1 << 20))


@pytest.mark.integration      # real models: a refine run (make test-unit skips it)
def test_a_refine_of_an_hf_corpus_from_the_cache(hub_home, refine_overrides, tiny_corpus,
                                                 tiny_model_dir, tmp_path):
    """``corpus=hf://...`` refined from the hub cache: it packs exactly what the same shards on disk
    pack, the folder's record names the hub corpus, and a second run reuses packing and passes."""
    from hydra import compose, initialize_config_dir

    from refine.__main__ import CONF_DIR, refine
    from refine.config import to_refine_config
    from refine.core.instances import Instances
    from refine.core.pack import pack
    from refine.core.tokenizer import load_tokenizer

    docs = [json.loads(x) for x in (tiny_corpus / "train.jsonl").read_text().splitlines()]
    shards = {"data/part-0.parquet": _parquet(docs[:250]),
              "data/part-1.jsonl.zst": _zstd(_jsonl(docs[250:]))}
    for rel, data in shards.items():
        _put(hub_home, V1, rel, data)
    url, out = "hf://datasets/acme/web@v1/data/part-*", tmp_path / "out"
    overrides = [o for o in refine_overrides if not o.startswith(("corpus=", "out="))] + [
        f"corpus={url}", f"out={out}", "pack.max_instances=96", "dedup.diversity=false",
        "logits.rs_samples=0"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_refine_config(compose("refine", overrides=overrides))
    manifest = refine(cfg)
    assert manifest["instances_scored"] == 96 and (out / "refined.jsonl").stat().st_size > 0
    assert json.loads((out / "scoring.json").read_text())["corpus"] == url
    local = pack(_local_copy(tmp_path, shards) / "data", load_tokenizer(tiny_model_dir), 64,
                 tmp_path / "local", quiet=True)
    scored = Instances(out / "instances_all")
    assert np.array_equal(np.asarray(scored.tokens), np.asarray(local.tokens))
    kept = ("instances_all", "teacher", "reference")
    stamps = {p: p.stat().st_mtime_ns for k in kept for p in (out / k).glob("*.json")}
    refine(cfg)                                  # the same commit and files: nothing is redone
    assert stamps and {p: p.stat().st_mtime_ns for p in stamps} == stamps


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)
