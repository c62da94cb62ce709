"""Artifacts on disk: content hashes and ``manifest.json`` files.

Every stage writes its outputs to a temporary name, fsyncs, then renames (``refine.core.write``, the one layer
that writes into output and run folders), so a half-written artifact is never mistaken for a finished one. A
stage's ``manifest.json`` (inputs and their hashes, resolved config, code version, counts, timings) is written
last; a stage whose manifest matches its inputs is skipped.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from refine.core.write import write_json_atomic

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_version() -> str:
    """Git commit of this checkout (with ``-dirty`` if modified), or ``unknown`` outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def manifest_matches(folder: str | Path, key: dict) -> bool:
    """True if ``folder`` holds a finished stage whose recorded ``key`` (inputs + config) equals ``key``."""
    m = read_manifest(folder)
    return m is not None and m.get("key") == json.loads(json.dumps(key, sort_keys=True, default=str))


def write_manifest(folder: str | Path, key: dict, **info: Any) -> dict:
    """Write ``manifest.json`` last: ``key`` decides whether a rerun may skip; ``info`` is provenance."""
    manifest = {"key": key, "code_version": code_version(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **info}
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest
