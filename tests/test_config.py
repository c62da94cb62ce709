"""Hydra composition: every experiment composes and validates; bad keys fail with one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill.config import KDConfig, TrainConfig, to_config
from distill.train import CONF_DIR
from refine.config import RefineConfig
from refine.core.errors import InputError
from refine.core.hydra_cli import compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _compose(overrides: list[str]) -> TrainConfig:
    return to_config(compose_config(CONF_DIR, "train", ["run_dir=runs/x", *overrides]))


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


# ---- choices: typed, rejected while the config is composed ------------------------------------------------

@pytest.mark.parametrize("config, override, line", [
    ("train", "kd.loss=kl2", "bad config: kd.loss='kl2' is not one of kld | nll | rkl | mse"),
    ("train", "trainer.nan_policy=ignore", "bad config: trainer.nan_policy='ignore' is not one of stop | skip"),
    ("train", "model.arch=gpt", "bad config: model.arch='gpt' is not one of llama | qwen2 | mamba"),
    ("refine", "select.mode=best", "bad config: select.mode='best' is not one of top | sample | random"),
    ("refine", "reference.backend=tgi", "bad config: reference.backend='tgi' is not one of vllm | hf | served"),
    ("refine", "logits.codec=gzip", "bad config: logits.codec='gzip' is not one of zstd | raw"),
])
def test_bad_choice_is_rejected_at_composition(config, override, line):
    with pytest.raises(InputError) as e:
        compose_config(CONF_DIR, config, [override])
    assert str(e.value) == line


@pytest.mark.parametrize("overrides, line", [
    (["kd.signal=offline"], "kd.signal=offline needs kd.logits"),
    (["kd.signal=online", "kd.rs_samples=8", "kd.temperature=2"], "a sampled (RS-KD) teacher signal needs"),
    (["kd.signal=online", "kd.rs_samples=8", "kd.loss=mse"], "a sampled (RS-KD) teacher signal needs"),
    (["kd.signal=online", "kd.loss=rkl", "kd.missing_mass=none"], "kd.loss=rkl needs a normalised"),
    (["kd.signal=offline", "kd.logits=x", "kd.missing_mass=tail", "kd.adaptive_temperature=true"],
     "kd.missing_mass=tail needs kd.temperature=1"),
])
def test_kd_combinations_are_refused_at_composition(overrides, line):
    """The loss/temperature/missing-mass rules live in KDConfig: a bad combination fails when the composed
    config is checked, before a store is opened or a teacher loaded (a store's kind: the same rule, later)."""
    with pytest.raises(InputError, match="^" + re.escape(line)):
        _compose(overrides)
    _compose(["kd.signal=online", "kd.rs_samples=8"])                                      # good ones pass
    _compose(["kd.signal=offline", "kd.logits=x", "kd.temperature=2"])


def test_bad_choice_in_an_experiment_file_is_rejected(tmp_path):
    conf = tmp_path / "conf"
    subprocess.run(["cp", "-r", str(CONF_DIR), str(conf)], check=True)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nkd:\n  alpha:\n    schedule: wsd2\n")
    with pytest.raises(InputError, match=r"^bad config: kd.alpha.schedule='wsd2' is not one of constant \| "):
        compose_config(conf, "train", ["+experiment=typo"])


@pytest.mark.integration
@pytest.mark.parametrize("module, override, key", [("distill.train", "schedule.name=linear", "schedule.name"),
                                                    ("refine", "teacher.dtype=fp8", "teacher.dtype")])
def test_bad_choice_on_cli_is_one_clear_line(module, override, key):
    res = subprocess.run([sys.executable, "-m", module, override], capture_output=True, text=True,
                         cwd=Path(CONF_DIR).parent, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: bad config: {key}=") and " is not one of " in lines[0], res.stderr


def test_bad_choice_in_python_is_rejected():
    """A config built in Python (tests, benchmarks) is checked the same way; a good string becomes the member."""
    with pytest.raises(InputError, match=r"KDConfig.missing_mass='half' is not one of auto \| renorm \| tail"):
        KDConfig(missing_mass="half")
    cfg = KDConfig(signal="online", loss="rkl")
    assert cfg.loss == "rkl" and type(cfg.loss).__name__ == "KDLoss"


def test_choices_match_what_the_code_implements():
    from distill.config import KDLoss, MissingMass
    from distill.losses import LOSSES, MISSING_MASS
    from refine.config import Backend, Codec
    from refine.core.forward import DTYPES
    from refine.core.logits import CODECS
    from refine.core.schema import Dtype
    from refine.scorers.registry import BACKENDS

    assert set(KDLoss) == set(LOSSES) and set(MissingMass) == {"auto", *MISSING_MASS}
    assert set(Dtype) == set(DTYPES) and set(Backend) == set(BACKENDS) and set(Codec) == set(CODECS)


# ---- one place per default ----------------------------------------------------------------------------------

def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _base_files() -> list[tuple[Path, type, str]]:
    """(file, schema, the file's package): the two base configs and every option of their schema's groups."""
    files = [(CONF_DIR / "train.yaml", TrainConfig, ""), (CONF_DIR / "refine.yaml", RefineConfig, "")]
    for group in ("model", "data", "optim", "schedule", "trainer", "kd", "paths"):
        files += [(p, TrainConfig, f"{group}.") for p in sorted((CONF_DIR / group).glob("*.yaml"))]
    return files


def test_yaml_never_repeats_a_schema_default():
    """Every default is written once, in the schema (distill/config.py, refine/config.py): a key in the base
    configs or a group option holding the schema's own default is a second copy that can drift. Experiments and
    +debug=tiny are left out: they are applied on top of other options, where restating a value can matter."""
    repeated, checked = [], 0
    for path, schema, package in _base_files():
        defaults = _leaves(OmegaConf.to_container(OmegaConf.structured(schema), resolve=False, enum_to_str=True))
        own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        own.pop("defaults", None), own.pop("hydra", None)
        for key, value in _leaves(own, package).items():
            checked += 1
            if key in defaults and defaults[key] == value:
                repeated.append(f"{path.relative_to(CONF_DIR)}: {key}: {value!r}")
    assert checked > 20 and not repeated, repeated


def test_base_configs_compose_to_the_schema_defaults():
    """train.yaml / refine.yaml add no values of their own but the Hydra wiring (run_dir) and group choices."""
    schema = _leaves(OmegaConf.to_container(OmegaConf.structured(RefineConfig), resolve=False, enum_to_str=True))
    composed = _leaves(OmegaConf.to_container(compose_config(CONF_DIR, "refine", []), resolve=False,
                                              enum_to_str=True))
    assert composed == schema
    train = _leaves(OmegaConf.to_container(compose_config(CONF_DIR, "train", ["model=llama_tiny"]), resolve=False,
                                           enum_to_str=True))
    schema = _leaves(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False, enum_to_str=True))
    assert {k: v for k, v in train.items() if train[k] != schema[k]} == {"run_dir": "${hydra:runtime.output_dir}"}


@pytest.mark.integration
def test_refine_help_lists_refine_groups_only():
    # conf/ holds the trainer's groups too; refine's --help names the ones refine.yaml composes (paths), not theirs
    res = subprocess.run([sys.executable, "-m", "refine", "--help"], capture_output=True, text=True,
                         cwd=Path(CONF_DIR).parent, timeout=120)
    assert res.returncode == 0, res.stderr
    groups = res.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "paths: default, gemma" in groups, res.stdout
    for other in ("experiment", "kd", "model", "optim", "schedule", "trainer", "debug"):
        assert f"{other}:" not in groups, res.stdout
    assert "select:" in res.stdout and "verbose: false" in res.stdout          # refine's own config follows


def test_the_cache_default_does_not_depend_on_the_launch_folder(tmp_path, monkeypatch):
    """One default for every cache path (``refine.core.paths.cache_dir``): launched from another folder, the
    apps' configs name the cache ``make data models`` filled, as ``fetch/`` and ``distill.evaluate`` do."""
    from refine.config import to_refine_config as refine_config
    from refine.core.paths import cache_dir

    monkeypatch.delenv("RD_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = _compose([])
    assert cfg.paths.cache == str(cache_dir()) and Path(cfg.paths.cache).is_absolute()
    assert cfg.kd.teacher == f"{cache_dir()}/models/smollm2-135m"
    refine = refine_config(compose_config(CONF_DIR, "refine", []))
    assert refine.corpus.startswith(str(cache_dir()))
    monkeypatch.setenv("RD_CACHE", str(tmp_path / "shared"))
    assert _compose([]).paths.cache == str(tmp_path / "shared")
