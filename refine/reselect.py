"""``select_only=true`` (``make select``): select again from the scores ``out`` holds, with this command's
``select.*``. What was scored comes from the folder's own record (``refine.folder_key``), whatever this command
says about it, so nothing is packed, embedded or scored, and the outputs equal a full run's with those settings."""

from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from refine.config import LogitsConfig, ModelPassConfig, RefineConfig
from refine.core.errors import InputError
from refine.core.instances import Instances
from refine.core.manifest import read_manifest
from refine.core.paths import resolve_model
from refine.core.tokenizer import load_tokenizer, tokenizer_hash
from refine.folder_key import saved_settings
from refine.outputs import Scored, write_selection

SAVED_SCORES = ("instances_scored/index.json", "teacher/pass.json", "teacher/nll.npy", "reference/pass.json",
                "reference/nll.npy")


def check_saved_scores(out: Path) -> None:
    missing = [p for p in SAVED_SCORES if not (out / p).is_file()]
    if missing or saved_settings(out) is None:
        why = f"no {missing[0]}" if missing else "no record of its settings"
        raise InputError(f"{out} holds no saved scores to select from ({why}): score it first with python -m "
                         f"refine (without select_only=true)")


def reselect(cfg: RefineConfig) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    check_saved_scores(out)
    cfg = _as_scored(cfg, saved_settings(out))
    inst = Instances(out / "instances_scored")
    tok = load_tokenizer(resolve_model(cfg.teacher.path))
    if inst.tokenizer.hash != tokenizer_hash(tok):
        raise InputError(f"the teacher at {cfg.teacher.path} is not the one {out} was scored with (another "
                         f"tokenizer)")
    previous = read_manifest(out) or {}
    emb = _saved_embeddings(out, inst) if cfg.dedup.enabled or cfg.dedup.diversity else None
    print(f"select_only: selecting from the saved scores of {len(inst):,} instances in {out} (nothing rescored)",
          flush=True)
    tpass, rpass = (json.loads((out / name / "pass.json").read_text()) for name in ("teacher", "reference"))
    return write_selection(cfg, out, Scored(
        inst, tok, emb, previous.get("report", {}).get("dedup", {}), tpass, rpass,
        previous.get("teacher", cfg.teacher.path), previous.get("reference", cfg.reference.path),
        previous.get("key", {}).get("corpus"), t0, 0.0, previous.get("reference_trained_on", {}).get("d_ref", {}),
        previous.get("reference_model", {})))


def _as_scored(cfg: RefineConfig, saved: dict) -> RefineConfig:
    """``cfg`` with the scoring settings replaced by those the folder records (``refine.folder_key``)."""
    def model(mine: ModelPassConfig, rec: dict) -> ModelPassConfig:   # (a carved reference has no path)
        return replace(mine, path=rec.get("path", mine.path), dtype=rec["dtype"], backend=rec["backend"])

    known = {f.name for f in fields(LogitsConfig)}
    logits = replace(cfg.logits, **{k: v for k, v in saved["logits"].items() if k in known})
    dedup = replace(cfg.dedup, enabled=saved["dedup"]["enabled"],
                    threshold=saved["dedup"].get("threshold", cfg.dedup.threshold))
    return replace(cfg, corpus=saved["corpus"], text_field=saved["text_field"], pack=replace(cfg.pack, **saved["pack"]),
                   dedup=dedup, teacher=model(cfg.teacher, saved["teacher"]),
                   reference=model(cfg.reference, saved["reference"]), logits=logits, shard_size=saved["shard_size"])


def _saved_embeddings(out: Path, inst: Instances) -> np.ndarray | None:
    """The cached embeddings of the scored instances (rows of a dedup subset picked out), or None."""
    parent, rows = inst.index.get("parent_sha256"), None
    if (out / "instances_dedup" / "index.json").is_file():
        dedup = Instances(out / "instances_dedup")
        if dedup.index["tokens_sha256"] == parent:
            parent, rows = dedup.index.get("parent_sha256"), dedup.subset["parent_rows"]
    try:
        if json.loads((out / "embeddings.json").read_text())["instances"] != parent:
            return None
        emb = np.load(out / "embeddings.npy", allow_pickle=False)
    except (OSError, ValueError, KeyError):
        return None
    return emb if rows is None else emb[rows]
