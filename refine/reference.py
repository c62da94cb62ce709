"""MiniPLM's reference LM: trained on D_ref, a held-out part of the corpus being refined, unless one is given.

A reference trained on another corpus makes the difference score measure how the two corpora differ, not what the
teacher knows better. So with ``reference.path`` empty, refine carves D_ref out of its own corpus by document id
(``refine.core.holdout``), writes it as JSONL into the cache, trains the reference on it with the project's trainer (a
``python -m distill.train`` child, resumable like any run) and scores everything else with it. A given reference
that is one of our runs is checked not to have been trained on documents that are being scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from array import array
from pathlib import Path

import numpy as np

from refine.config import RefineConfig
from refine.core.corpus import CorpusStats, iter_documents
from refine.core.errors import InputError
from refine.core.holdout import HoldOut, budget_fraction
from refine.core.instances import Instances
from refine.core.manifest import read_manifest, write_manifest
from refine.core.paths import resolve_model
from refine.core.tokenizer import encode_text, tokenizer_hash
from refine.core.write import atomic_path, write_json_atomic

CARVE_BATCH = 256


def hold_out(record: dict) -> HoldOut:
    """The D_ref split that ``carve`` made (its ``record``): the one packing leaves out. With a token budget its
    fraction is lower than ``ref_split.fraction``."""
    return HoldOut(record["fraction"], record["seed"])


def carve(cfg: RefineConfig, corpus_key: str, tok) -> tuple[Path, dict]:
    """D_ref's documents as ``d_ref.jsonl`` (training) and ``d_ref_val.jsonl`` (validation) in a cache folder
    named by the corpus and the split (any refine of that corpus with that split reuses it, and its reference).
    Returns the folder and its record (documents and tokens of each part, the effective fraction)."""
    split, max_tokens = HoldOut(cfg.ref_split.fraction, cfg.ref_split.seed), cfg.ref_split.max_tokens
    if max_tokens < 0 or 0 < max_tokens < cfg.ref_split.min_tokens:
        raise InputError(f"ref_split.max_tokens={max_tokens:,} must be 0 (no budget) or at least "
                         f"ref_split.min_tokens={cfg.ref_split.min_tokens:,}")
    key = {"corpus": corpus_key, "split": split.key(), "text_field": cfg.text_field,
           "max_doc_bytes": cfg.max_doc_bytes, "tokenizer_hash": tokenizer_hash(tok)}
    if max_tokens:                               # (no budget stays out: existing folders keep their key)
        key["max_tokens"] = max_tokens
    folder = Path(cfg.paths.cache) / "d_ref" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    previous = read_manifest(folder)
    if previous and previous.get("key") == key:
        return folder, previous["d_ref"]
    unit_list, tokens = array("d"), array("q")  # of every document below the fraction, in corpus order: 16 bytes each
    with atomic_path(folder / "d_ref.jsonl") as train_tmp, atomic_path(folder / "d_ref_val.jsonl") as val_tmp:
        with open(train_tmp, "w") as train_f, open(val_tmp, "w") as val_f:
            batch: list = []
            docs = iter_documents(cfg.corpus, text_field=cfg.text_field, stats=CorpusStats(),
                                  max_doc_bytes=cfg.max_doc_bytes)
            for doc in docs:
                if split.holds(doc.id):
                    batch.append(doc)
                if len(batch) == CARVE_BATCH:
                    _write(batch, split, tok, unit_list, tokens, train_f, val_f)
                    batch = []
            _write(batch, split, tok, unit_list, tokens, train_f, val_f)
        units, tokens = np.frombuffer(unit_list), np.frombuffer(tokens, dtype=np.int64)
        fraction = budget_fraction(units, tokens, split.fraction, max_tokens)
        if fraction < split.fraction:
            _keep_below(fraction, unit_list, split, train_tmp, val_tmp)
    record = {**_counts(units, tokens, HoldOut(fraction, split.seed)), "fraction": fraction, "seed": split.seed}
    if max_tokens:
        record.update(max_tokens=max_tokens, max_fraction=split.fraction)
    write_manifest(folder, key, corpus=str(cfg.corpus), d_ref=record)
    return folder, record


def _write(batch: list, split: HoldOut, tok, units: array, tokens: array, train_f, val_f) -> None:
    if not batch:
        return
    lengths = map(len, encode_text(tok, [d.text for d in batch]))
    for doc, n in zip(batch, lengths):
        (val_f if split.is_val(doc.id) else train_f).write(
            json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}, ensure_ascii=False) + "\n")
        units.append(split.unit(doc.id))
        tokens.append(n)


def _keep_below(fraction: float, units: array, split: HoldOut, train_tmp: Path, val_tmp: Path) -> None:
    """Rewrite the carved files with only the documents below ``fraction`` (and its validation share), in corpus
    order: the files a carve at ``fraction`` without a budget writes. A document's line is the next one of the file
    ``split`` put it in."""
    capped = HoldOut(fraction, split.seed)
    new_train, new_val = train_tmp.with_name("capped_train"), val_tmp.with_name("capped_val")
    with open(train_tmp, "rb") as old_train, open(val_tmp, "rb") as old_val, open(new_train, "wb") as train_f, \
            open(new_val, "wb") as val_f:
        for u in units:
            line = (old_val if u < split.val_below else old_train).readline()
            if u < fraction:
                (val_f if u < capped.val_below else train_f).write(line)
    os.replace(new_train, train_tmp)
    os.replace(new_val, val_tmp)


def _counts(units: np.ndarray, tokens: np.ndarray, split: HoldOut) -> dict:
    """Documents and tokens of each part of ``split``."""
    held, val = units < split.fraction, units < split.val_below
    return {part: {"documents": int(mask.sum()), "tokens": int(tokens[mask].sum())}
            for part, mask in (("train", held & ~val), ("val", val))}


def check_size(cfg: RefineConfig, record: dict) -> None:
    need, cap = cfg.ref_split.min_tokens, cfg.ref_split.max_tokens
    budget, raise_budget = (f", max_tokens={cap:,}", " or ref_split.max_tokens") if cap else ("", "")
    if record["train"]["tokens"] < need or record["val"]["documents"] == 0:
        raise InputError(
            f"{cfg.corpus} is too small to carve a reference split from: {record['train']['tokens']:,} tokens in "
            f"{record['train']['documents']:,} D_ref documents (ref_split.fraction={cfg.ref_split.fraction}{budget}) "
            f"and {record['val']['documents']} for its validation, need {need:,} (ref_split.min_tokens) and 1; raise "
            f"ref_split.fraction{raise_budget}, or give a pretrained reference with the teacher's tokenizer "
            f"(reference.path=...)")


def train(cfg: RefineConfig, teacher: Path, folder: Path, vocab: int, d_ref: dict) -> tuple[Path, dict]:
    """The reference LM trained on ``folder``'s D_ref by ``python -m distill.train`` (its output streams through);
    a run folder per training setting, so a finished one is reused and a killed one resumes. Sized to the teacher
    and D_ref (``refine.reference_size``) unless ``ref_split.sizing=fixed``. Returns the model and what the
    manifest and report say about it: the plan, and the run's summary (validation loss, steps, early stop)."""
    from refine.reference_size import estimate_seconds, plan

    rs = cfg.ref_split
    sized = plan(rs, teacher, vocab, d_ref, cfg.pack.seq_len) if rs.sizing == "auto" else None
    overrides = [f"+experiment={rs.experiment}", f"data.train={folder / 'd_ref.jsonl'}",
                 f"data.val={folder / 'd_ref_val.jsonl'}", "data.text_field=text", f"model.tokenizer={teacher}",
                 f"paths.cache={cfg.paths.cache}", *(sized.overrides() if sized else []), *rs.overrides]
    tag = hashlib.sha256(json.dumps([read_manifest(folder)["key"], overrides]).encode()).hexdigest()[:10]
    run = folder / f"run-{tag}"
    if not (run / "summary.json").is_file():
        print(sized.describe(estimate_seconds(sized)) if sized else
              f"reference LM: the fixed +experiment={rs.experiment} (ref_split.sizing=fixed)", flush=True)
        print(f"training the reference LM on D_ref -> {run}", flush=True)
        res = subprocess.run([sys.executable, "-m", "distill.train", *overrides, f"run_dir={run}",
                              f"hydra.run.dir={run}", f"run_name=reference-{cfg.name}"])
        if res.returncode != 0:
            raise InputError(f"training the reference LM failed (exit {res.returncode}); its run folder is {run}, "
                             f"rerun to resume")
    write_json_atomic(folder / "reference.json", {"run": str(run), "overrides": overrides})
    summary = json.loads((run / "summary.json").read_text())
    return resolve_model(run), {"kind": f"trained on D_ref ({rs.sizing})", "run": str(run),
                                "plan": sized.record() if sized else None, "overrides": overrides,
                                "training": {k: summary.get(k) for k in ("steps", "tokens", "val_loss", "val_ppl",
                                                                         "best_val_loss", "best_step",
                                                                         "stopped_early", "seconds_this_session")}}


def check_not_trained_on_scored(reference: Path, scored: Instances) -> None:
    """Refuse a reference of ours whose training documents are among those being scored (by document id)."""
    run = reference.parent.parent if reference.parent.name == "checkpoints" else None
    record = run / "run.json" if run else None
    if record is None or not record.is_file():
        return                                  # not one of our runs: nothing recorded to check against
    try:
        trained = Instances(json.loads(record.read_text())["train_instances"]["path"]).stream_root()
    except (InputError, KeyError, OSError, ValueError):
        return
    trained_ids = set(trained.docs.ids(0, len(trained.docs)))
    root = scored.stream_root()
    step = 65536
    for a in range(0, len(root.docs), step):
        common = trained_ids.intersection(root.docs.ids(a, min(a + step, len(root.docs))))
        if common:
            raise InputError(f"reference {reference} was trained on documents that are being scored "
                             f"({len(common)}+ shared ids, e.g. {sorted(common)[0]!r}); a reference must not have "
                             f"seen the corpus it scores: leave reference.path empty to carve D_ref from it")
