"""What a refine folder's scores were made with, and the refusal to mix in or destroy anything else.

``<out>/scoring.json`` records every setting that changes a scored number or which instances get scored (the
corpus, packing, dedup, both models' path/dtype/backend, the logit capture, the shard size); each pass folder
also keeps its ``key.json`` (model fingerprint, instances hash, capture settings). A run whose settings differ
from what the folder holds stops with one line naming them: hours of someone else's scoring are never
deleted by a stray setting. ``overwrite=true`` replaces the folder on purpose.

Records are created exclusively (``refine.core.write.claim_json``: a hard link of a finished temporary, atomic on
local disks and NFS): of two writers that start together on shared storage with different settings, exactly one
record wins and the other writer refuses, rather than both writing shards of two configurations into one folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from refine.core.errors import InputError
from refine.core.hub_corpus import is_hub_corpus
from refine.core.write import LOCK_NAME, claim_json

SETTINGS = "scoring.json"
# ref_split settings that only ref_split.sizing=auto reads
AUTO_SIZING = ("sizing", "param_ratio", "epochs", "min_train_tokens", "max_train_tokens", "patience")


def scoring_settings(c: dict) -> dict:
    """The scoring-relevant part of a refine config (``asdict(RefineConfig)``, or an older manifest's copy).
    Selection, report, threads, URLs and the codec (converted in place, no rescoring) are left out: they may
    change from run to run."""
    def model(p: dict) -> dict:
        return {"path": os.path.abspath(p.get("path", "")), "dtype": p.get("dtype"), "backend": p.get("backend")}

    def reference(c: dict) -> dict:
        ref = c.get("reference", {})
        if ref.get("path"):
            return model(ref)
        # carved from the corpus: what D_ref is and how the reference is trained decide its scores (no budget
        # stays out, so folders scored before ref_split.max_tokens existed keep their settings)
        d_ref = {k: v for k, v in (c.get("ref_split") or {}).items() if k != "max_tokens" or v}
        if d_ref.get("sizing", "fixed") == "fixed":   # (as folders scored before sizing existed: the experiment)
            d_ref = {k: v for k, v in d_ref.items() if k not in AUTO_SIZING}
        return {"d_ref": d_ref, "dtype": ref.get("dtype"), "backend": ref.get("backend")}

    dedup = c.get("dedup", {})
    pack = {k: v for k, v in (c.get("pack") or {}).items() if k != "workers"}   # workers: the same output
    corpus = c.get("corpus", "")     # hf://: as named (its commit is in the packing's key)
    corpus = corpus if is_hub_corpus(corpus) else os.path.abspath(corpus)
    return normal({"corpus": corpus, "text_field": c.get("text_field"),
                   "pack": pack, "dedup": {"enabled": dedup.get("enabled"),
                                           **({"threshold": dedup.get("threshold")}
                                              if dedup.get("enabled") else {})},
                   "teacher": model(c.get("teacher", {})), "reference": reference(c),
                   "logits": {k: v for k, v in c.get("logits", {}).items() if k != "codec"},
                   "shard_size": c.get("shard_size")})


def normal(obj) -> dict:
    """As JSON reads it back (tuples are lists, keys are strings), so a fresh dict compares with a saved one."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def differences(saved: dict, wanted: dict, prefix: str = "", unknown_ok: bool = False) -> list[str]:
    """``name (A in the folder, B here)`` for every leaf that differs; long values (fingerprints) by name.
    ``unknown_ok``: a setting the folder's record does not have (an older version's manifest) is no difference."""
    out = []
    for k in sorted(set(saved) | set(wanted)):
        a, b = saved.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.", unknown_ok)
        elif a != b and not (unknown_ok and a is None):
            shown = f" ({a} in the folder, {b} here)" if len(f"{a}{b}") < 80 else ""
            out.append(f"{prefix}{k}{shown}")
    return out


def saved_settings(out: Path) -> dict | None:
    """``scoring.json``, or for a folder written before it existed, what its last finished run's manifest says."""
    if (out / SETTINGS).is_file():
        return json.loads((out / SETTINGS).read_text())
    try:
        return scoring_settings(json.loads((out / "manifest.json").read_text())["key"]["config"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse (one line) when ``out`` holds scores made with other settings; with ``overwrite``, empty it first.
    The caller holds the folder's lock, exclusive when ``overwrite``: no other writer on this host is in it."""
    settings = normal(settings)
    saved = saved_settings(out)
    diff = [] if saved is None else differences(saved, settings, unknown_ok=not (out / SETTINGS).is_file())
    if diff:
        if not overwrite:
            raise refusal(out, diff)
        print(f"overwrite=true: replacing {out} (scored with {'; '.join(diff)})", flush=True)
        for entry in out.iterdir():
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    held = claim_json(out / SETTINGS, settings)
    if held != settings:                    # another writer claimed the folder a moment ago
        raise refusal(out, differences(held, settings))


def refusal(folder: Path, diff: list[str]) -> InputError:
    return InputError(f"{folder} holds scores made with other settings: {'; '.join(diff)}; nothing was changed: "
                      f"use another out= (or name=), or overwrite=true to replace them")

