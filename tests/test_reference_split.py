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
from refine.core.holdout import HoldOut, budget_fraction
from refine.core.pack import corpus_fingerprint, pack
from refine.core.tokenizer import load_tokenizer
from refine.folder_key import scoring_settings
from refine.reference import carve, check_not_trained_on_scored, check_size, hold_out
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


def _carve(corpus: Path, tok, cache: Path, **split) -> tuple[Path, dict]:
    cfg = _cfg(corpus, min_tokens=1000, **split)
    cfg.paths.cache = str(cache)
    return carve(cfg, corpus_fingerprint(corpus), tok)


def _ids(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text().splitlines()]


def test_budget_fraction_stops_before_the_document_that_passes_the_budget():
    units, tokens = np.array([0.4, 0.1, 0.3, 0.2, 0.3]), np.array([5, 10, 7, 20, 1])
    # in unit order: 10, 30, then the two at 0.3 (7 + 1) would reach 38, 43
    assert budget_fraction(units, tokens, 0.5, 0) == 0.5                  # no budget
    assert budget_fraction(units, tokens, 0.5, 43) == 0.5                 # all of it fits
    assert budget_fraction(units, tokens, 0.5, 30) == 0.3                 # 0.1 and 0.2
    assert budget_fraction(units, tokens, 0.5, 37) == 0.3                 # one id at 0.3 fits, so would the other:
    assert budget_fraction(units, tokens, 0.5, 38) == 0.4                 # same unit, in or out together
    assert budget_fraction(units, tokens, 0.5, 9) == 0.1                  # nothing: min_tokens refuses it


def test_a_token_budget_holds_out_the_lowest_unit_documents_up_to_it(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    corpus = tiny_corpus / "train.jsonl"
    docs = list(iter_documents(corpus))
    n_tokens = {d.id: len(tok(d.text, add_special_tokens=False)["input_ids"]) for d in docs}
    unit = HoldOut(0.5).unit
    budget = sum(n_tokens.values()) // 6                                  # about a third of the 50% candidates
    folder, record = _carve(corpus, tok, tmp_path / "cache", fraction=0.5, max_tokens=budget)
    split = hold_out(record)
    assert split.fraction < 0.5 and record["max_fraction"] == 0.5 and record["max_tokens"] == budget
    by_unit = sorted((d.id for d in docs), key=unit)
    held = [i for i in by_unit if split.holds(i)]
    assert held == by_unit[:len(held)]                                    # the lowest units ...
    held_tokens = sum(n_tokens[i] for i in held)
    assert held_tokens <= budget < held_tokens + n_tokens[by_unit[len(held)]]   # ... as many as the budget allows
    assert record["train"]["tokens"] + record["val"]["tokens"] == held_tokens
    train, val = _ids(folder / "d_ref.jsonl"), _ids(folder / "d_ref_val.jsonl")
    in_order = [d.id for d in docs if split.holds(d.id)]
    assert sorted(train + val, key=in_order.index) == in_order and val == [i for i in in_order if split.is_val(i)]
    assert val and record["val"]["documents"] == len(val) and record["train"]["documents"] == len(train)
    # the same files as a carve at that fraction with no budget: the budget only moves the threshold
    plain, plain_record = _carve(corpus, tok, tmp_path / "plain", fraction=split.fraction)
    for name in ("d_ref.jsonl", "d_ref_val.jsonl"):
        assert (folder / name).read_bytes() == (plain / name).read_bytes()
    assert {k: record[k] for k in plain_record} == plain_record
    # packing leaves out exactly D_ref: nothing scored that the reference saw, no document lost
    rest = pack(corpus, tok, 64, tmp_path / "rest", quiet=True, hold_out=split)
    scored = rest.docs.ids(0, len(rest.docs))
    assert not set(scored) & set(train + val)
    assert sorted(scored + train + val) == sorted(n_tokens)
    too_few = _cfg(corpus, fraction=0.5, min_tokens=budget, max_tokens=budget)   # the budget holds val tokens too
    with pytest.raises(InputError, match=r"\(ref_split.fraction=0.5, max_tokens=.*raise ref_split.fraction or "
                                         r"ref_split.max_tokens"):
        check_size(too_few, record)


def test_a_budget_the_fraction_stays_within_changes_nothing(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    corpus = tiny_corpus / "train.jsonl"
    plain, plain_record = _carve(corpus, tok, tmp_path / "cache", fraction=0.3)
    everything = plain_record["train"]["tokens"] + plain_record["val"]["tokens"]
    for budget in (everything, 10 * everything):
        folder, record = _carve(corpus, tok, tmp_path / "cache", fraction=0.3, max_tokens=budget)
        assert folder != plain                                              # another setting, another folder
        assert {k: record[k] for k in plain_record} == plain_record and plain_record["fraction"] == 0.3
        for name in ("d_ref.jsonl", "d_ref_val.jsonl"):
            assert (folder / name).read_bytes() == (plain / name).read_bytes()


def test_no_budget_leaves_the_folder_keys_as_they_were(tiny_tokenizer_dir, tiny_corpus, tmp_path):
    """Folders carved or scored before ``ref_split.max_tokens`` existed are found and reused as they are."""
    tok = load_tokenizer(tiny_tokenizer_dir)
    corpus = tiny_corpus / "train.jsonl"
    folder, _ = _carve(corpus, tok, tmp_path / "cache", fraction=0.3)
    key = json.loads((folder / "manifest.json").read_text())["key"]
    assert sorted(key) == ["corpus", "max_doc_bytes", "split", "text_field", "tokenizer_hash"]
    assert key["split"] == {"fraction": 0.3, "seed": 0}
    cfg = _cfg(corpus)
    cfg.ref_split.sizing = "fixed"      # the miniature, as every folder scored before sizing existed
    assert sorted(scoring_settings(asdict(cfg))["reference"]["d_ref"]) == [
        "experiment", "fraction", "min_tokens", "overrides", "seed"]
    cfg.ref_split.sizing = "auto"       # a reference sized to the job is another reference: its own settings
    assert {"sizing", "epochs", "min_train_tokens"} < set(scoring_settings(asdict(cfg))["reference"]["d_ref"])
    cfg.ref_split.max_tokens = 50_000_000
    assert scoring_settings(asdict(cfg))["reference"]["d_ref"]["max_tokens"] == 50_000_000
    budgeted, _ = _carve(corpus, tok, tmp_path / "cache", fraction=0.3, max_tokens=1_000_000)
    assert json.loads((budgeted / "manifest.json").read_text())["key"] == {**key, "max_tokens": 1_000_000}


def test_a_budget_below_min_tokens_is_refused_before_carving(tiny_corpus, tmp_path):
    for bad in (-1, 999):
        cfg = _cfg(tiny_corpus / "train.jsonl", min_tokens=1000, max_tokens=bad)
        cfg.paths.cache = str(tmp_path / "cache")
        with pytest.raises(InputError, match=r"ref_split.max_tokens=.* must be 0 \(no budget\) or at least "
                                             r"ref_split.min_tokens=1,000"):
            carve(cfg, "", None)
    assert not (tmp_path / "cache").exists()


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
    """The whole path through the CLI: D_ref carved (to a token budget), the reference sized to the teacher and
    trained by the trainer on it to its own budget (ref_split.sizing=auto: a few passes over this small D_ref),
    every other document scored with it, the manifest and report saying what the reference is and learnt; a
    rerun reuses it all."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "refine", f"corpus={tiny_corpus / 'train.jsonl'}", f"teacher.path={tiny_model_dir}",
            "teacher.backend=hf", "reference.backend=hf", "pack.seq_len=64", "shard_size=16", "logits.top_k=4",
            f"out={out}", f"paths.cache={tmp_path / 'cache'}", "ref_split.fraction=0.3", "ref_split.min_tokens=1000",
            "ref_split.max_tokens=5000", "ref_split.min_train_tokens=12000", "dedup.diversity=false",
            'ref_split.overrides=["trainer.progress=false","trainer.loggers=[]"]']
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    trained_on = manifest["reference_trained_on"]["d_ref"]
    assert trained_on["fraction"] < 0.3 and 1000 <= trained_on["train"]["tokens"] + trained_on["val"]["tokens"] <= 5000
    assert "/cache/d_ref/" in manifest["reference"]
    run = Path(manifest["reference"]).parents[1]
    plan, training = manifest["reference_model"]["plan"], manifest["reference_model"]["training"]
    assert manifest["reference_model"]["kind"] == "trained on D_ref (auto)"
    assert plan["shape"]["hidden"] == 64 and plan["params"] < plan["teacher_params"]   # the teacher: 128 wide
    assert plan["train_tokens"] >= 12000 and plan["seq_len"] == 64
    assert plan["d_ref_tokens"] == trained_on["train"]["tokens"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == training["steps"] <= plan["max_steps"] and "stopped_early" in summary
    assert f"{plan['params'] / 1e6:.1f}M parameters" in res.stdout and "passes over D_ref" in res.stdout
    report = (out / "report.md").read_text()
    assert "| reference | trained on D_ref (auto) |" in report and "D_ref-validation perplexity" in report
    assert "Spearman of the score with NLL_ref / NLL_teacher" in report
    split = HoldOut(trained_on["fraction"])
    from refine.core.instances import Instances

    scored = Instances(out / "instances_scored").stream_root().docs
    scored = scored.ids(0, len(scored))
    d_ref = [json.loads(x)["id"] for name in ("d_ref.jsonl", "d_ref_val.jsonl")
             for x in (run.parent / name).read_text().splitlines()]
    assert not any(split.holds(i) for i in scored) and not set(scored) & set(d_ref)
    assert any(HoldOut(0.3).holds(i) for i in scored)                   # the budget's threshold, not the fraction
    assert sorted(scored + d_ref) == sorted(d.id for d in iter_documents(tiny_corpus / "train.jsonl"))
    assert len(np.load(out / "reference" / "nll.npy")) == len(Instances(out / "instances_scored"))
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0 and "training the reference LM" not in again.stdout, again.stderr[-2000:]
    # re-selecting keeps what the manifest says about the reference (it used to drop reference_trained_on)
    res = subprocess.run(args + ["select_only=true", "select.alpha=0.3"], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    reselected = json.loads((out / "manifest.json").read_text())
    assert reselected["reference_trained_on"] == manifest["reference_trained_on"]
    assert reselected["reference_model"] == manifest["reference_model"]
