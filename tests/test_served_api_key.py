"""A teacher server started with ``--api-key`` (real ``vllm serve`` on loopback, one start): without the key
the refine run ends with one line naming the variable to set; with it, the served teacher's NLLs are the
transformers backend's, and the key is nowhere in the output folder, the manifests or the run's output."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from refine.core.errors import InputError
from refine.scorers.registry import make_scorer
from tests.conftest import REPO
from tests.test_served_scorer import Server

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)

KEY = "rd-test-key-7f3a9c"          # what the server wants; only ever in the environment of the runs below
ENV_NAME = "RD_TEST_TEACHER_KEY"


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("keyed_server") / "server.log",
                 extra_args=("--api-key", KEY))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_keyed_teacher_server(keyed_server, refine_overrides, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    served = [o for o in refine_overrides if not o.startswith(("teacher.backend=", "out="))] + [
        "teacher.backend=served", f"teacher.urls=[{keyed_server.url}]", f"teacher.api_key_env={ENV_NAME}",
        "pack.max_instances=48", f"out={out}"]
    env = {k: v for k, v in os.environ.items() if k != ENV_NAME}
    cmd = [sys.executable, "-m", "refine", *served]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = res.stderr.strip().splitlines()       # (above it: the reference model's loading bar, for diversity)
    assert res.returncode == 2 and [x for x in lines if x.startswith("error: ")] == lines[-1:], res.stderr[-3000:]
    assert f"requires an API key (HTTP 401): put its --api-key in the environment variable {ENV_NAME}" in lines[-1]
    assert not (out / "teacher" / "pass.json").exists()

    res = subprocess.run(cmd, cwd=REPO, env={**env, ENV_NAME: KEY}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # The same numbers as a teacher without a server (fp32 sums differ only in order).
    from refine.config import LogitsConfig, ModelPassConfig
    from refine.score_pass import PassConfig, run_pass

    hf = tmp_path / "hf"
    model = ModelPassConfig(str(tiny_model_dir), "hf", batch_rows=32)
    run_pass(PassConfig(str(out / "instances_scored"), str(hf), model, 16, LogitsConfig(top_p=0.9, top_k=10),
                        quiet=True))
    diff = np.abs(np.load(out / "teacher" / "nll.npy") - np.load(hf / "nll.npy")).max()
    print(f"keyed server vs transformers: max NLL diff {diff:.1e}")
    assert diff < 1e-4
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaks == [] and KEY not in res.stdout + res.stderr
    assert ENV_NAME in (out / "manifest.json").read_text()           # the variable's name is what is recorded

    monkeypatch.setenv(ENV_NAME, "not-the-key")
    with pytest.raises(InputError, match=f"rejected the API key in the environment variable {ENV_NAME}") as e:
        make_scorer("served", str(tiny_model_dir), top_k=10, urls=[keyed_server.url], api_key_env=ENV_NAME)
    assert "not-the-key" not in str(e.value)
