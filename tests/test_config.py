"""Hydra composition: every experiment composes and validates; bad keys fail with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distill.config import TrainConfig, to_config
from distill.train import CONF_DIR
from refine.core.errors import InputError

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _compose(overrides: list[str]) -> TrainConfig:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=runs/x", *overrides])
    return to_config(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("debug", [False, True])
def test_every_experiment_composes(experiment, debug):
    cfg = _compose([f"+experiment={experiment}"] + (["+debug=tiny"] if debug else []))
    assert cfg.run_name == experiment
    if debug:
        assert cfg.model.name == "llama_tiny" and cfg.trainer.max_steps <= 50
        # the smoke run keeps the experiment's row length: packed (refined) data has only that one
        assert cfg.data.seq_len == _compose([f"+experiment={experiment}"]).data.seq_len


@pytest.mark.parametrize("model", MODELS)
def test_every_model_size_composes(model):
    assert _compose([f"model={model}"]).model.name == model


def test_experiments_exist():
    assert {"lm_baseline", "reference"} <= set(EXPERIMENTS)


def test_unknown_key_added_with_plus_is_rejected_by_schema():
    with pytest.raises(InputError, match="lr_typo"):
        _compose(["+optim.lr_typo=1"])


def test_wrong_type_is_rejected():
    with pytest.raises(InputError, match="max_steps"):
        _compose(["trainer.max_steps=lots"])


def _run_train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.train", *args], capture_output=True, text=True,
                          cwd=Path(CONF_DIR).parent, timeout=120)


@pytest.mark.integration
def test_unknown_key_on_cli_is_one_clear_line():
    res = _run_train(["+experiment=lm_baseline", "optim.lr_typo=1"])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "lr_typo" in lines[0], res.stderr


@pytest.mark.integration
def test_unknown_experiment_is_one_clear_line():
    res = _run_train(["+experiment=no_such_experiment"])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_experiment" in lines[0], res.stderr
