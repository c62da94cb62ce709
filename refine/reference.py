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
import subprocess
import sys
from pathlib import Path

from refine.config import RefineConfig
from refine.core.corpus import CorpusStats, iter_documents
from refine.core.errors import InputError
from refine.core.holdout import HoldOut
from refine.core.instances import Instances
from refine.core.manifest import atomic_path, read_manifest, write_json_atomic, write_manifest
from refine.core.paths import resolve_model
from refine.core.tokenizer import tokenizer_hash

CARVE_BATCH = 256


def hold_out(cfg: RefineConfig) -> HoldOut | None:
    """The D_ref split of this run, or None when a reference is given."""
    return None if cfg.reference.path else HoldOut(cfg.ref_split.fraction, cfg.ref_split.seed)


def carve(cfg: RefineConfig, corpus_key: str, tok) -> tuple[Path, dict]:
    """D_ref's documents as ``d_ref.jsonl`` (training) and ``d_ref_val.jsonl`` (validation) in a cache folder
    named by the corpus and the split (any refine of that corpus with that split reuses it, and its reference).
    Returns the folder and its record (documents and tokens of each part)."""
    split = hold_out(cfg)
    key = {"corpus": corpus_key, "split": split.key(), "text_field": cfg.text_field,
           "max_doc_bytes": cfg.max_doc_bytes, "tokenizer_hash": tokenizer_hash(tok)}
    folder = Path(cfg.paths.cache) / "d_ref" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    previous = read_manifest(folder)
    if previous and previous.get("key") == key:
        return folder, previous["d_ref"]
    counts = {"train": {"documents": 0, "tokens": 0}, "val": {"documents": 0, "tokens": 0}}
    with atomic_path(folder / "d_ref.jsonl") as train_tmp, atomic_path(folder / "d_ref_val.jsonl") as val_tmp, \
            open(train_tmp, "w") as train_f, open(val_tmp, "w") as val_f:
        batch: list = []
        docs = iter_documents(cfg.corpus, text_field=cfg.text_field, stats=CorpusStats(),
                              max_doc_bytes=cfg.max_doc_bytes)
        for doc in docs:
            if split.holds(doc.id):
                batch.append(doc)
            if len(batch) == CARVE_BATCH:
                _write(batch, split, tok, counts, train_f, val_f)
                batch = []
        _write(batch, split, tok, counts, train_f, val_f)
    record = {**counts, "fraction": split.fraction, "seed": split.seed}
    write_manifest(folder, key, corpus=str(cfg.corpus), d_ref=record)
    return folder, record


def _write(batch: list, split: HoldOut, tok, counts: dict, train_f, val_f) -> None:
    if not batch:
        return
    lengths = map(len, tok([d.text for d in batch], add_special_tokens=False)["input_ids"])
    for doc, n in zip(batch, lengths):
        part = "val" if split.is_val(doc.id) else "train"
        (val_f if part == "val" else train_f).write(
            json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}, ensure_ascii=False) + "\n")
        counts[part]["documents"] += 1
        counts[part]["tokens"] += n


def check_size(cfg: RefineConfig, record: dict) -> None:
    need = cfg.ref_split.min_tokens
    if record["train"]["tokens"] < need or record["val"]["documents"] == 0:
        raise InputError(
            f"{cfg.corpus} is too small to carve a reference split from: {record['train']['tokens']:,} tokens in "
            f"{record['train']['documents']:,} D_ref documents (ref_split.fraction={cfg.ref_split.fraction}) and "
            f"{record['val']['documents']} for its validation, need {need:,} (ref_split.min_tokens) and 1; raise "
            f"ref_split.fraction, or give a pretrained reference with the teacher's tokenizer (reference.path=...)")


def train(cfg: RefineConfig, teacher: Path, folder: Path) -> Path:
    """The reference LM trained on ``folder``'s D_ref by ``python -m distill.train`` (its output streams through);
    a run folder per training setting, so a finished one is reused and a killed one resumes."""
    overrides = [f"+experiment={cfg.ref_split.experiment}", f"data.train={folder / 'd_ref.jsonl'}",
                 f"data.val={folder / 'd_ref_val.jsonl'}", "data.text_field=text", f"model.tokenizer={teacher}",
                 f"paths.cache={cfg.paths.cache}", *cfg.ref_split.overrides]
    tag = hashlib.sha256(json.dumps([read_manifest(folder)["key"], overrides]).encode()).hexdigest()[:10]
    run = folder / f"run-{tag}"
    if not (run / "summary.json").is_file():
        print(f"training the reference LM on D_ref -> {run}", flush=True)
        res = subprocess.run([sys.executable, "-m", "distill.train", *overrides, f"run_dir={run}",
                              f"hydra.run.dir={run}", f"run_name=reference-{cfg.name}"])
        if res.returncode != 0:
            raise InputError(f"training the reference LM failed (exit {res.returncode}); its run folder is {run}, "
                             f"rerun to resume")
    write_json_atomic(folder / "reference.json", {"run": str(run), "overrides": overrides})
    return resolve_model(run)


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
