"""The folder guards on their own (no models): the writer lock between real processes, exclusive record
claims, and the settings record of a folder written before ``scoring.json`` existed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest

from refine.config import RefineConfig
from refine.core.errors import InputError
from refine.core.write import FolderLock, claim_json
from refine.folder_key import check_settings, scoring_settings
from tests.conftest import REPO

HOLD = """
import sys, time
from refine.core.write import FolderLock
with FolderLock(sys.argv[1], "test writer", "use another folder", shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(folder, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_modes_between_processes(tmp_path):
    holder = _holder(tmp_path, "shared")                     # a shard part at work
    try:
        with FolderLock(tmp_path, "part", "x", shared=True):  # another part: fine
            pass
        with pytest.raises(InputError, match=rf"being written by another refine run \(host \S+ pid {holder.pid}\);"):
            with FolderLock(tmp_path, "refine run", "use another out="):
                pass
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path, "finisher", "x"):               # the killed holder's lock is taken over
        with pytest.raises(InputError, match=f"pid {os.getpid()}"):
            with FolderLock(tmp_path, "part", "x", shared=True):
                pass


def test_claims_are_exclusive_and_legacy_folders_keep_their_scores(tmp_path):
    assert claim_json(tmp_path / "k.json", {"a": 1}) == {"a": 1}
    assert claim_json(tmp_path / "k.json", {"a": 2}) == {"a": 1}          # the first record stands
    assert [p.name for p in tmp_path.iterdir()] == ["k.json"]            # no claim temporary left
    # A folder refined before scoring.json: its manifest's config is the record; settings that config did not
    # have yet are no difference, a real one is.
    cfg = asdict(RefineConfig(corpus="/data/c.jsonl"))
    old = {k: v for k, v in cfg.items()}
    old["logits"] = {k: v for k, v in cfg["logits"].items() if k not in ("rs_samples", "candidates")}
    (tmp_path / "manifest.json").write_text(json.dumps({"key": {"config": old}}))
    check_settings(tmp_path, scoring_settings(cfg), overwrite=False)
    assert json.loads((tmp_path / "scoring.json").read_text())["logits"]["rs_samples"] == 0
    other = {**cfg, "teacher": {**cfg["teacher"], "dtype": "bfloat16"}}
    with pytest.raises(InputError, match=r"teacher.dtype \(float32 in the folder, bfloat16 here\); nothing was"):
        check_settings(tmp_path, scoring_settings(other), overwrite=False)
    (tmp_path / "teacher").mkdir()
    check_settings(tmp_path, scoring_settings(other), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scoring.json"]
