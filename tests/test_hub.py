"""Hub ids as model paths, resolved offline through a hub-layout cache built here from a local model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from refine.core.errors import InputError
from refine.core.hub import hub_id
from refine.core.paths import resolve_model
from refine.core.tokenizer import load_tokenizer, tokenizer_hash
from refine.scorers.registry import make_scorer
from tests.conftest import HUB_COMMIT, offline_hub_repo

COMMIT = HUB_COMMIT


@pytest.fixture
def hub_home(tiny_model_dir, tmp_path, monkeypatch) -> Path:
    """``HF_HOME`` holding ``acme/tiny`` as huggingface_hub lays a download out (refs/main -> snapshots/<commit>),
    plus a pickled weights file that must never be picked up."""
    snap = offline_hub_repo(tmp_path, monkeypatch) / "snapshots" / COMMIT
    shutil.copytree(tiny_model_dir, snap, dirs_exist_ok=True)
    (snap / "pytorch_model.bin").write_bytes(b"not for loading")
    return tmp_path / "hf"


def test_a_hub_id_resolves_offline_to_its_snapshot(hub_home, tiny_model_dir):
    for name in ("acme/tiny", f"acme/tiny@{COMMIT}"):
        folder = resolve_model(name)
        assert folder.name == COMMIT and (folder / "config.json").is_file()
    assert tokenizer_hash(load_tokenizer("acme/tiny")) == tokenizer_hash(load_tokenizer(tiny_model_dir))
    rows = np.asarray(load_tokenizer("acme/tiny")("The river and the king.")["input_ids"])[None, :]
    by_id = make_scorer("hf", str(resolve_model("acme/tiny")), top_k=4).score(rows)
    local = make_scorer("hf", str(tiny_model_dir), top_k=4).score(rows)
    np.testing.assert_array_equal(by_id.topk_ids, local.topk_ids)
    np.testing.assert_allclose(by_id.token_logprobs, local.token_logprobs, atol=1e-6)


def test_a_missing_id_offline_is_one_line(hub_home):
    for name in ("acme/other", "acme/tiny@v9"):
        with pytest.raises(InputError, match=r"not in the hub cache .*offline.*hf download") as e:
            resolve_model(name)
        assert "\n" not in str(e.value)


def test_local_paths_are_not_hub_ids(hub_home):
    (hub_home.parent / "runs").mkdir()
    assert hub_id("runs/reference") is None              # its first folder exists here: a local path
    assert hub_id("./acme/tiny") is None and hub_id("/abs/path") is None and hub_id("a/b/c") is None
    assert hub_id("HuggingFaceTB/SmolLM2-135M@main") == ("HuggingFaceTB/SmolLM2-135M", "main")
    with pytest.raises(InputError, match="no model at runs/reference"):
        resolve_model("runs/reference")
