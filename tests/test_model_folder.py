"""Model folders from elsewhere: no code of theirs runs, no pickle of theirs is read, each refusal is one line.
Before, evaluation, export and training's checkpoint loader left ``trust_remote_code`` unset (transformers then
asks at the terminal) and fell back to a ``pytorch_model.bin`` (an UnpicklingError traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from refine.core.errors import InputError
from refine.core.model_folder import load_causal_lm, load_config
from tests.conftest import REPO


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_folder_that_asks_to_run_its_own_code_is_refused(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "foreign")
    ran = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('x')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    for load in (load_causal_lm, load_config):
        with pytest.raises(InputError, match="asks to run code of its own .auto_map in config.json.; refused"):
            load(folder)
    # the command a user runs on such a folder: one line, nothing ran, no prompt (stdin closed)
    res = subprocess.run([sys.executable, "-m", "distill.evaluate", str(folder), "--val", str(tmp_path / "x.jsonl"),
                          "--tasks", ""], cwd=REPO, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "asks to run code of its own" in lines[0], res.stderr[-2000:]
    assert not ran.exists()


def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "pickled")
    model = load_causal_lm(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"no safetensors weights in .*pickled \(pytorch_model\.bin: pickled "
                                         r"weights are not loaded"):
        load_causal_lm(folder)
    with pytest.raises(InputError, match="not a model folder .no config.json."):
        load_causal_lm(tmp_path)
    # every scorer's folder is checked once, by the registry, before its backend is imported: vLLM would load
    # the pickle (its load_format=auto falls back to .bin); a served teacher's folder needs no weights
    from refine.scorers.registry import make_scorer

    for kind in ("vllm", "hf"):
        with pytest.raises(InputError, match=r"no safetensors weights in .*pickled"):
            make_scorer(kind, str(folder))
