"""D_ref from the corpus being refined: the split, packing without it, carving it, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from refine.config import RefineConfig
from refine.core.corpus import iter_documents
from refine.core.errors import InputError
from refine.core.holdout import HoldOut
from refine.core.pack import corpus_fingerprint, pack
from refine.core.tokenizer import load_tokenizer
from refine.folder_key import scoring_settings
from refine.reference import carve, check_not_trained_on_scored, check_size
from tests.conftest import REPO


def _cfg(corpus: Path, **split) -> RefineConfig:
    cfg = RefineConfig(corpus=str(corpus))
    cfg.reference.path = ""
    for k, v in split.items():
        setattr(cfg.ref_split, k, v)
    return cfg


def test_the_split_depends_on_the_id_only():
    h = HoldOut(0.2, seed=0)
    ids = [f"doc/{i}" for i in range(20_000)]
    held = [i for i in ids if h.holds(i)]
    assert 0.18 < len(held) / len(ids) < 0.22
    assert held == [i for i in reversed(ids) if h.holds(i)][::-1]                  # order-free
    assert all(h.holds(i) for i in ids if h.is_val(i))                            # val is inside D_ref
    assert 0.01 < sum(map(h.is_val, ids)) / len(ids) < 0.03
    assert held != [i for i in ids if HoldOut(0.2, seed=1).holds(i)]              # the seed picks another D_ref
    with pytest.raises(InputError, match=r"fraction must be in \(0, 1\)"):
        HoldOut(1.5)


def test_packing_leaves_exactly_d_ref_out(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    corpus = tiny_corpus / "train.jsonl"
    split = HoldOut(0.25)
    everything = pack(corpus, tok, 64, tmp_path / "all", quiet=True)
    rest = pack(corpus, tok, 64, tmp_path / "rest", quiet=True, hold_out=split)
    ids = [d.id for d in iter_documents(corpus)]
    assert rest.docs.ids(0, len(rest.docs)) == [i for i in ids if not split.holds(i)]
    assert len(everything.docs) == len(ids) > len(rest.docs)
    manifest = json.loads((tmp_path / "rest" / "manifest.json").read_text())
    assert manifest["key"]["hold_out"] == {"fraction": 0.25, "seed": 0}
    assert manifest["held_out_documents"] == len(ids) - len(rest.docs)


def test_carve_writes_d_ref_and_refuses_a_corpus_too_small(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    corpus = tiny_corpus / "train.jsonl"
    cfg = _cfg(corpus, fraction=0.3, min_tokens=1000)
    cfg.paths.cache = str(tmp_path / "cache")
    folder, record = carve(cfg, corpus_fingerprint(corpus), tok)
    assert folder.parent == tmp_path / "cache" / "d_ref"
    split = HoldOut(0.3)
    held = [d for d in iter_documents(corpus) if split.holds(d.id)]
    train = [json.loads(x) for x in (folder / "d_ref.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (folder / "d_ref_val.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in train + val) == sorted(d.id for d in held)
    assert {r["id"] for r in val} == {d.id for d in held if split.is_val(d.id)} and val
    assert record["train"]["tokens"] == sum(len(tok(r["text"])["input_ids"]) for r in train)
    check_size(cfg, record)
    # reused as it is: the files are not rewritten
    mtime = (folder / "d_ref.jsonl").stat().st_mtime_ns
    assert carve(cfg, corpus_fingerprint(corpus), tok) == (folder, record)
    assert (folder / "d_ref.jsonl").stat().st_mtime_ns == mtime
    with pytest.raises(InputError, match=r"too small to carve a reference split from: .* need 10,000,000") as e:
        check_size(_cfg(corpus, fraction=0.3, min_tokens=10_000_000), record)
    assert "\n" not in str(e.value)


def test_a_reference_trained_on_scored_documents_is_refused(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    scored = pack(tiny_corpus / "train.jsonl", tok, 64, tmp_path / "scored", quiet=True)
    for name, corpus, refused in (("leaky", tiny_corpus / "train.jsonl", True), ("clean", tiny_corpus / "ref.jsonl",
                                                                                  False)):
        trained = pack(corpus, tok, 64, tmp_path / f"trained_{name}", quiet=True)
        ckpt = tmp_path / name / "checkpoints" / "step_0000010"
        ckpt.mkdir(parents=True)
        (tmp_path / name / "run.json").write_text(json.dumps({"train_instances": {"path": str(trained.folder)}}))
        if refused:
            with pytest.raises(InputError, match="was trained on documents that are being scored"):
                check_not_trained_on_scored(ckpt, scored)
        else:
            check_not_trained_on_scored(ckpt, scored)
    check_not_trained_on_scored(tmp_path / "not_ours", scored)          # no run record: nothing to check


def test_the_folder_key_of_a_carved_reference_is_its_split(tiny_corpus):
    cfg = _cfg(tiny_corpus / "train.jsonl", fraction=0.1)
    settings = scoring_settings(asdict(cfg))
    assert settings["reference"]["d_ref"]["fraction"] == 0.1
    cfg.ref_split.fraction = 0.2
    assert scoring_settings(asdict(cfg)) != settings


@pytest.mark.integration
def test_refine_carves_d_ref_trains_the_reference_and_never_scores_it(tiny_corpus, tiny_model_dir, tmp_path):
    """The whole path through the CLI: D_ref carved, the reference trained by the trainer on it, every other
    document scored with it, the manifest saying what the reference learnt; a rerun reuses it all."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "refine", f"corpus={tiny_corpus / 'train.jsonl'}", f"teacher.path={tiny_model_dir}",
            "teacher.backend=hf", "reference.backend=hf", "pack.seq_len=64", "shard_size=16", "logits.top_k=4",
            f"out={out}", f"paths.cache={tmp_path / 'cache'}", "ref_split.fraction=0.3", "ref_split.min_tokens=1000",
            "dedup.diversity=false",
            'ref_split.overrides=["+debug=tiny","data.seq_len=64","trainer.max_steps=6","trainer.eval_every=3",'
            '"trainer.ckpt_every=3"]']
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    trained_on = manifest["reference_trained_on"]["d_ref"]
    assert trained_on["fraction"] == 0.3 and trained_on["train"]["tokens"] >= 1000
    assert "/cache/d_ref/" in manifest["reference"]
    run = Path(manifest["reference"]).parents[1]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    split = HoldOut(0.3)
    from refine.core.instances import Instances

    scored = Instances(out / "instances_scored").stream_root()
    assert not any(split.holds(i) for i in scored.docs.ids(0, len(scored.docs)))
    assert len(np.load(out / "reference" / "nll.npy")) == len(Instances(out / "instances_scored"))
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0 and "training the reference LM" not in again.stdout, again.stderr[-2000:]
