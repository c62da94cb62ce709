"""The served scorer (``refine.scorers.served``): a real ``vllm serve`` of the tiny Llama on loopback against the
in-process vLLM engine on the same rows (same numbers), several endpoints at once (two names of the same
server, a dead port, a proxy that starts failing mid-run: retries, then failover), the score_pass CLI with
``--backend served``; and, without vLLM, the failure paths against small fake servers.

The server and the in-process engine each run in their own child process (see tests/test_scorers.py for why
vLLM stays out of the pytest process); they start side by side to share the wait.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from refine.core.engine_settings import cpu_defaults
from refine.core.errors import InputError
from refine.scorers.registry import make_scorer
from tests.conftest import REPO, scoring_rows

pytestmark = pytest.mark.integration   # real engines, processes or training runs (make test-unit skips)

K = 20
VOCAB = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fake_server(handle):
    """A loopback HTTP server answering ``handle(method, path, body) -> (status, dict)``; yields its URL."""
    def respond(h, path, body):
        status, out = handle(h.command, path, body)
        _send(h, status, json.dumps(out).encode())

    with raw_server(respond) as url:
        yield url


class Server:
    def __init__(self, model_dir: Path, log: Path, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
        cpu_defaults(env)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--max-model-len", "256", "--max-logprobs", str(K), "--enforce-eager", "--disable-log-stats",
               "--uvicorn-log-level", "warning", *extra_args]
        self.t0 = time.perf_counter()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)
        self.start_s: float | None = None

    def wait_ready(self, timeout: float = 300) -> float:
        while self.start_s is None:
            if self.proc.poll() is not None:
                pytest.fail(f"vllm server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.start_s = time.perf_counter() - self.t0
            except OSError:
                if time.perf_counter() - self.t0 > timeout:
                    pytest.fail(f"vllm server not up after {timeout} s:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.5)
        return self.start_s

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)      # the server and its engine-core child
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("vllm_server") / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


VLLM_SCRIPT = """
import sys, time, numpy as np
from refine.scorers.registry import make_scorer
rows = np.load(sys.argv[2])
s = make_scorer("vllm", sys.argv[1], top_k=int(sys.argv[3]), dtype="float32", enforce_eager=True)
s.score(rows[:1])
t = time.perf_counter()
out = s.score(rows)
secs = time.perf_counter() - t
s.bos_id = 3
outb = s.score(rows)
s.close()
np.savez(sys.argv[4], token=out.token_logprobs, ids=out.topk_ids, lps=out.topk_logprobs, secs=secs,
         token_bos=outb.token_logprobs, ids_bos=outb.topk_ids, lps_bos=outb.topk_logprobs)
"""


def _same(a_lps, a_ids, b_lps, b_ids, tol=1e-5) -> float:
    """Max abs log-prob difference; ids must agree rank by rank wherever neighbouring log-probs are apart."""
    diff = float(np.abs(a_lps - b_lps).max())
    assert diff < tol
    separated = np.abs(np.diff(b_lps, axis=-1, append=-np.inf)) > 1e-5
    separated[..., 1:] &= separated[..., :-1]
    assert (a_ids == b_ids)[separated].all() and separated.mean() > 0.9
    return diff


@contextmanager
def failing_proxy(target: str, ok_completions: int):
    """Forwards to ``target``; after ``ok_completions`` completions every completion gets a 503."""
    state = {"completions": 0, "failed": 0}

    def handle(method, path, body):
        if path.startswith("/v1/completions"):
            state["completions"] += 1
            if state["completions"] > ok_completions:
                state["failed"] += 1
                return 503, {"error": {"message": "overloaded"}}
        req = urllib.request.Request(target + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with fake_server(handle) as url:
        yield url, state


def test_served_matches_in_process_engine(server, tiny_model_dir, tiny_corpus, tmp_path, capfd):
    rows = scoring_rows(tiny_model_dir, 8)
    np.save(tmp_path / "rows.npy", rows)
    child = subprocess.Popen([sys.executable, "-c", VLLM_SCRIPT, str(tiny_model_dir), str(tmp_path / "rows.npy"),
                              str(K), str(tmp_path / "inproc.npz")], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        start_s = server.wait_ready()
        dead = f"http://127.0.0.1:{free_port()}"
        with failing_proxy(server.url, ok_completions=2) as (proxy, state):   # 2: the start-up probes pass
            # Two names of the one server, a dead port (left out at start), a proxy that fails once scoring starts.
            urls = [server.url, f"http://localhost:{server.port}/v1", dead, proxy]
            s = make_scorer("served", str(tiny_model_dir), top_k=K, urls=urls, max_concurrency=4, timeout=60,
                            retries=1, backoff=0.05)
            assert s.model == "tiny" and s.max_model_len == 256
            t = time.perf_counter()
            out = s.score(rows.astype(np.uint16))                    # as packed instances store them
            served_s = time.perf_counter() - t
            assert state["failed"] == 2                              # one request: tried twice, then moved on
            with pytest.raises(InputError, match="max_model_len >= 257"):
                s.score(np.zeros((1, 256), dtype=np.int64))
            with pytest.raises(InputError, match=r"0\.\.399"):
                s.score(np.full((1, 4), VOCAB))                      # never sent: it would kill a tokenizer-less server
            s.bos_id = 3                                             # a BOS-prefixed teacher (Gemma)
            outb = s.score(rows)
            s.close()
        err = capfd.readouterr().err
        assert f"{dead} left out" in err and f"{proxy} set aside: HTTP 503" in err
        top0 = make_scorer("served", str(tiny_model_dir), top_k=0, urls=[server.url])
        out0 = top0.score(rows)
        top0.close()
        _, stderr = child.communicate(timeout=600)
        assert child.returncode == 0, stderr[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
    v = np.load(tmp_path / "inproc.npz")

    assert out.token_logprobs.shape == (8, 63) and out.topk_ids.shape == out.topk_logprobs.shape == (8, 63, K)
    assert out.token_logprobs.dtype == out.topk_logprobs.dtype == np.float32 and out.topk_ids.dtype == np.int32
    assert (np.diff(out.topk_logprobs, axis=-1) <= 0).all()                     # most likely first
    diff_token = float(np.abs(out.token_logprobs - v["token"]).max())
    diff_topk = _same(out.topk_logprobs, out.topk_ids, v["lps"], v["ids"])
    diff_bos = max(float(np.abs(outb.token_logprobs - v["token_bos"]).max()),
                   _same(outb.topk_logprobs, outb.topk_ids, v["lps_bos"], v["ids_bos"]))
    print(f"vllm server up in {start_s:.0f} s; served vs in-process max abs diff: token {diff_token:.1e}, "
          f"top-{K} {diff_topk:.1e}, BOS {diff_bos:.1e}; "
          f"{rows.size / served_s:,.0f} tok/s served vs {rows.size / float(v['secs']):,.0f} in-process")
    assert diff_token < 1e-5 and diff_bos < 1e-5
    assert (out.topk_ids[5, :, 0] == rows[5, 1:]).all()                        # the greedy row: actual = top-1
    assert np.allclose(out.topk_logprobs[5, :, 0], out.token_logprobs[5])
    assert np.abs(outb.token_logprobs - out.token_logprobs).max() > 1e-3      # the prefix changes the scores
    assert out0.topk_ids is None and np.array_equal(out0.token_logprobs, out.token_logprobs)

    # The score_pass CLI on the served backend: the pass's NLLs are the HF scorer's (to 1e-4 in fp32).
    from refine.config import LogitsConfig, ModelPassConfig
    from refine.core.pack import pack
    from refine.core.tokenizer import load_tokenizer
    from refine.score_pass import PassConfig, main, run_pass

    inst = pack(tiny_corpus / "val.jsonl", load_tokenizer(tiny_model_dir), 64, tmp_path / "inst", quiet=True)
    (tmp_path / "pass.json").write_text(json.dumps({   # the JSON the refine parent hands its scoring child
        "instances": str(inst.folder), "out": str(tmp_path / "served"), "shard_size": 16,
        "model": {"path": str(tiny_model_dir), "backend": "served", "urls": [server.url], "batch_rows": 8,
                  "engine": {"served_model": "tiny", "max_concurrency": 2}},
        "logits": {"top_k": 5, "top_p": 0.95}}))
    main([str(tmp_path / "pass.json")])
    hf = run_pass(PassConfig(str(inst.folder), str(tmp_path / "hf"), ModelPassConfig(str(tiny_model_dir), "hf",
                                                                                      batch_rows=32),
                             16, LogitsConfig(top_p=0.95, top_k=5), quiet=True))
    served_nll = np.load(tmp_path / "served" / "nll.npy")
    assert len(served_nll) == hf["instances"] == len(inst)
    assert np.abs(served_nll - np.load(tmp_path / "hf" / "nll.npy")).max() < 1e-4
    assert (tmp_path / "served" / "logits" / "store.json").is_file()


# ---- failure paths, no vLLM ---------------------------------------------------------------------------------

def fake_vllm(models=("tiny",), vocab=VOCAB, fail=0, refuse=None):
    """What the checks see of a vLLM server (no scoring): ``fail`` 503s first, ``refuse``: a 400 message for
    completions with prompt_logprobs >= 0."""
    calls = {"n": 0}

    def handle(method, path, body):
        calls["n"] += 1
        if calls["n"] <= fail:
            return 503, {"error": {"message": "starting"}}
        if path == "/v1/models":
            return 200, {"data": [{"id": m, "max_model_len": 256} for m in models]}
        if path == "/v1/completions" and body["prompt_logprobs"] == -1:
            return 400, {"error": {"message": f"Requested prompt logprobs of {vocab}, which is greater than max "
                                              f"allowed: 20"}}
        if path == "/v1/completions" and refuse:
            return 400, {"error": {"message": refuse}}
        if path == "/v1/completions":
            prompt, k = body["prompt"], body["prompt_logprobs"]
            pos = [None] + [{str(t): {"logprob": -1.0, "rank": 1}} | {str(100 + j): {"logprob": -2.0 - j,
                                                                                       "rank": j + 1}
                                                                    for j in range(k)} for t in prompt[1:]]
            return 200, {"choices": [{"index": 0, "prompt_logprobs": pos}]}
        return 404, {"error": {"message": "no such route"}}

    return handle, calls


def test_served_scorer_failures(tiny_model_dir, capfd):
    d = str(tiny_model_dir)
    fast = dict(retries=1, backoff=0.01, timeout=0.5)
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InputError, match=r"no teacher server answers: .*refused \(after 2 attempts\)"):
        make_scorer("served", d, top_k=K, urls=[closed], **fast)
    with socket.socket() as silent:                       # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t = time.perf_counter()
        with pytest.raises(InputError, match=r"timed out \(after 2 attempts\)"):
            make_scorer("served", d, top_k=K, urls=[f"http://127.0.0.1:{silent.getsockname()[1]}"], **fast)
        assert time.perf_counter() - t < 5
    handle, calls = fake_vllm(fail=1)                    # one 503, then fine: retried on the same endpoint
    with fake_server(handle) as url:
        s = make_scorer("served", d, top_k=3, urls=f"{url} {closed}", **fast)
        assert s.model == "tiny" and len(s.score(np.array([[1, 2, 3]])).topk_ids[0]) == 2
        s.close()
    assert f"{closed} left out" in capfd.readouterr().err
    cases = [(fake_vllm(models=("other",)), {"served_model": "tiny"}, r"serves \['other'\], not the teacher 'tiny'"),
             (fake_vllm(models=("a", "b")), {}, "serves 2 models"),
             (fake_vllm(vocab=512), {}, "vocabulary of 512, the local teacher 400"),
             (fake_vllm(refuse="Requested prompt logprobs of 20, which is greater than max allowed: 5"), {},
              "refused a probe: HTTP 400: Requested prompt logprobs of 20.*--max-logprobs 20 or more")]
    for (handle, _), kw, match in cases:
        with fake_server(handle) as url, pytest.raises(InputError, match=match):
            make_scorer("served", d, top_k=K, urls=[url], **kw, **fast)
    with pytest.raises(InputError, match="at least one server URL"):
        make_scorer("served", d, top_k=K)
    with pytest.raises(InputError, match="http:// or https://"):
        make_scorer("served", d, top_k=K, urls=["gpu1:8000"])
    with pytest.raises(InputError, match=r"unknown option.*tensor_parallel_size"):
        make_scorer("served", d, top_k=K, urls=[closed], tensor_parallel_size=2)
    with pytest.raises(InputError, match="unknown scorer"):
        make_scorer("onnx", d)
    with pytest.raises(InputError, match="no data parallelism"):
        make_scorer("vllm", d, top_k=K, data_parallel_size=2)   # refused before vLLM is imported


# ---- hostile servers: each misbehaviour is one InputError line, bounded in time and memory ----------------

@contextmanager
def raw_server(respond):
    """A loopback server whose ``respond(handler, path)`` writes whatever bytes it likes; yields its URL."""
    class Handler(BaseHTTPRequestHandler):
        def _any(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            try:
                respond(self, self.path, body)
            except (BrokenPipeError, ConnectionResetError):
                pass                                     # the client hung up on us: what is being tested

        do_GET = do_POST = _any

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads, srv.block_on_close = True, False     # a dripping handler must not hold up the test
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _send(h, status: int, data: bytes, headers: dict | None = None) -> None:
    h.send_response(status)
    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


def _vllm_then(completions):
    """The fake vLLM's model list and vocabulary check, then ``completions(h, body)`` for the rest."""
    handle, _ = fake_vllm()

    def respond(h, path, body):
        if path == "/v1/completions" and body["prompt_logprobs"] >= 0:
            return completions(h, body)
        status, out = handle("GET" if body is None else "POST", path, body)
        _send(h, status, json.dumps(out).encode())
    return respond


def _positions(body, bad_id=None, shape=None):
    k = body["prompt_logprobs"]
    pos = [None] + [{str(t): {"logprob": -1.0, "rank": 1}} | {str(100 + j): {"logprob": -2.0 - j, "rank": j + 1}
                                                              for j in range(k)} for t in body["prompt"][1:]]
    if bad_id is not None:
        top = pos[1].pop(str(100 + k - 1))
        pos[1][str(bad_id)] = top
    if shape is not None:
        pos[1] = shape
    return json.dumps({"choices": [{"index": 0, "prompt_logprobs": pos}]}).encode()


def test_hostile_servers_are_one_line(tiny_model_dir):
    d, fast = str(tiny_model_dir), dict(retries=1, backoff=0.01, timeout=1.0)

    def fails(respond, match, **kw):
        with raw_server(respond) as url, pytest.raises(InputError, match=match) as e:
            make_scorer("served", d, top_k=3, urls=[url], **{**fast, **kw})
        assert "\n" not in str(e.value)
        return str(e.value)

    # token ids out of range: a huge one and a negative one (the raw store would wrap it, bincount would blow)
    for bad in (2_000_000_000, -3):
        fails(_vllm_then(lambda h, b, bad=bad: _send(h, 200, _positions(b, bad_id=bad))),
              f"token id {bad}, outside the vocabulary 0..399")
    # a malformed position (a list where an object belongs) and a wrong number of positions
    fails(_vllm_then(lambda h, b: _send(h, 200, _positions(b, shape=[1, 2]))),
          "malformed prompt_logprobs at position 1")
    fails(_vllm_then(lambda h, b: _send(h, 200, b'{"choices": [{"prompt_logprobs": {"a": 1}}]}')),
          "returned dict prompt positions")
    # deeply nested JSON: the parser's RecursionError is a bad answer, retried, then one line
    nested = b"[" * 100_000 + b"]" * 100_000            # (within the model list's 131,072 values: parsed)
    fails(lambda h, path, body: _send(h, 200, nested), r"JSON nested too deeply \(200000 bytes\) \(after 2 attempts\)")
    # an answer bigger than the request's cap is not read to the end (the model list: 4 MiB)
    t = time.perf_counter()
    fails(lambda h, path, body: _send(h, 200, b" " * (64 << 20)), r"answered /v1/models with more than 4,194,304 bytes")
    assert time.perf_counter() - t < 10

    # a redirect to another host is not followed (the other server never hears from us)
    hits = []
    with raw_server(lambda h, path, body: hits.append(path) or _send(h, 200, b"{}")) as elsewhere:
        fails(lambda h, path, body: _send(h, 302, b"", {"Location": elsewhere + path}),
              r"HTTP 302: a redirect to '.*/v1/models', not followed")
    assert hits == []

    # a server dripping one byte every 0.2 s: the deadline is the whole request, not each socket read
    def drip(h, path, body):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.2)
    t = time.perf_counter()
    fails(drip, r"timed out \(after 2 attempts\)")
    assert time.perf_counter() - t < 4                   # 2 attempts x 1 s deadline, not 200 s of drip
