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

    # the key as `$(cat key)` reads a file with CRLF line ends: its CR stays (before: http.client's error line
    # printed it, in the terminal and in logs/teacher.log); HTTP drops the whitespace around a header value
    res = subprocess.run(cmd, cwd=REPO, env={**env, ENV_NAME: KEY + "\r"}, capture_output=True, text=True,
                         timeout=600)
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


def test_a_key_a_header_cannot_carry_is_one_line_without_the_key(monkeypatch):
    """Around the key, spaces and line ends are dropped; inside it, a control character is refused naming the
    variable. Should a header value still be one http.client refuses, its error (which quotes the value) is
    replaced by a line without it."""
    import socket

    from refine.scorers.http_pool import ServerPool
    from refine.scorers.served import api_key

    monkeypatch.setenv(ENV_NAME, f" {KEY}\r\n")
    assert api_key(ENV_NAME) == KEY
    monkeypatch.setenv(ENV_NAME, f"{KEY}\nX-Injected: 1")
    with pytest.raises(InputError, match=f"environment variable {ENV_NAME} holds characters") as e:
        api_key(ENV_NAME)
    assert KEY not in str(e.value)
    with socket.socket() as listener:               # accepts the connection (backlog); never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        pool = ServerPool([url], 5.0, 0, 0.0, 60.0, lambda body: 1 << 20, {"Authorization": f"Bearer {KEY}\n"},
                          quiet=True)
        with pytest.raises(InputError, match="a header holds characters HTTP cannot carry") as e:
            pool.http(pool.endpoints[0], "/v1/models")
    assert KEY not in str(e.value)


def test_api_key_env_must_name_a_variable():
    """A key given where the variable's name goes would be saved in manifest.json: refused without showing it."""
    from refine.config import ModelPassConfig

    with pytest.raises(InputError, match="must be the name of an environment variable") as e:
        ModelPassConfig(path="x", api_key_env="sk-live-1234/abcd")
    assert "sk-live" not in str(e.value)
    assert ModelPassConfig(path="x", api_key_env="").api_key_env == ""
