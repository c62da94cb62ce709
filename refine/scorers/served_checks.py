"""The served scorer's start-up checks: every endpoint serves the teacher, with its vocabulary, and takes K.

Per endpoint (in parallel): ``/v1/models`` (it must serve ``served_model``, or exactly one model when it is not
given; its ``max_model_len`` bounds the rows), the served vocabulary size (before any large id is sent: a
tokenizer-less server does not check ids, and one out of range kills its engine), one probe completion (the
server takes ``prompt_logprobs=K`` and the tokenizer's largest id) and, when the server has a tokenizer,
``/tokenize`` of a probe text against the local tokenizer. An endpoint that does not answer is left out with a
warning; when none answers, or one serves another model or vocabulary, or refuses K, it is one ``InputError``.
"""

from __future__ import annotations

import re
import sys
import time

import numpy as np

from refine.core.errors import InputError
from refine.scorers.http_pool import Endpoint, EndpointDown, Refused, Retryable

PROBE_TEXT = "The river, 1813: Miss Bennet's letter to the king. Ünïcode — 日本語.\n"


def check_endpoints(scorer) -> int:
    """Check every endpoint of ``scorer.pool`` (a ``ServedScorer``); the smallest ``max_model_len`` of the live
    ones. Sets ``scorer.model`` when it was not given."""
    pool = scorer.pool
    found = list(scorer.threads.map(lambda ep: _check_one(scorer, ep), pool.endpoints))
    live = [e for e, ok in zip(pool.endpoints, found) if ok]
    if not live:
        raise InputError("no teacher server answers: " + "; ".join(f"{e.url}: {e.reason}" for e in pool.endpoints))
    for e in pool.endpoints:
        if e not in live and not scorer.quiet:
            print(f"warning: teacher server {e.url} left out: {e.reason}", file=sys.stderr, flush=True)
    return min(e.max_model_len for e in live)


def _check_one(scorer, ep: Endpoint) -> bool:
    pool = scorer.pool
    try:
        models = pool.with_retries(ep, "/v1/models")
    except EndpointDown as e:
        ep.down_since, ep.reason = time.monotonic(), str(e)
        return False
    except Refused as e:
        if e.code == 401:
            raise InputError(_key_refused(scorer, ep)) from None
        raise InputError(f"{ep.url} is not an OpenAI-compatible server (/v1/models: {e})") from None
    _check_model(scorer, ep, models)
    try:
        # The model's vocabulary size, before any id near its end is sent: a server started with
        # --skip-tokenizer-init does not check ids, and an out-of-vocabulary one kills its engine.
        served_vocab = _served_vocab(scorer, ep)
        if served_vocab is not None and scorer.vocab_size is not None and served_vocab != scorer.vocab_size:
            raise InputError(f"teacher server {ep.url} ({scorer.model}) has a vocabulary of {served_vocab}, the "
                             f"local teacher {scorer.vocab_size}: another model")
        # A probe: the server takes our largest token id and prompt_logprobs=K, and answers in the expected form.
        top_id = len(scorer.tokenizer) - 1
        out = pool.with_retries(ep, "/v1/completions", scorer.body([0, top_id]))
    except EndpointDown as e:
        ep.down_since, ep.reason = time.monotonic(), str(e)
        return False
    except Refused as e:
        hint = f" (start it with --max-logprobs {scorer.top_k} or more)" if "logprobs" in str(e) else ""
        raise InputError(f"teacher server {ep.url} ({scorer.model}) refused a probe: {e}{hint}") from None
    scorer.parse(out, ep.url, np.array([0, top_id]))
    # Same vocabulary: the server's tokenizer (when it has one) splits a probe text as ours does.
    try:
        tok = pool.http(ep, "/tokenize", {"model": scorer.model, "prompt": PROBE_TEXT, "add_special_tokens": False})
    except (Retryable, Refused):
        return True                  # no tokenizer on the server (--skip-tokenizer-init) or no endpoint
    ours = scorer.probe_ids
    if isinstance(tok.get("tokens"), list) and list(tok["tokens"]) != list(ours):
        raise InputError(f"teacher server {ep.url} ({scorer.model}) uses another vocabulary than the local "
                         f"tokenizer: the probe text is {tok['tokens'][:8]}... there, {ours[:8]}... here")
    return True


def _check_model(scorer, ep: Endpoint, models: dict) -> None:
    """The endpoint serves the teacher (the one model, when none was named); records its ``max_model_len``."""
    data = models.get("data")
    entries = {m["id"]: m for m in (data if isinstance(data, list) else [])
               if isinstance(m, dict) and isinstance(m.get("id"), str)}
    ep.served = list(entries)
    with scorer.pool.lock:
        if scorer.model is None:
            if len(entries) != 1:
                raise InputError(f"{ep.url} serves {len(entries)} models {ep.served}: say which one "
                                 f"(teacher.engine.served_model / --served-model)")
            scorer.model = ep.served[0]
    if scorer.model not in entries:
        raise InputError(f"{ep.url} serves {ep.served}, not the teacher {scorer.model!r}")
    max_len = entries[scorer.model].get("max_model_len") or 0
    if not isinstance(max_len, int) or max_len < 0:
        raise InputError(f"{ep.url} reports max_model_len {str(max_len)[:40]!r} for {scorer.model}, not a count")
    ep.max_model_len = max_len or 1 << 30


def _key_refused(scorer, ep: Endpoint) -> str:
    """The one line for an HTTP 401: it names the variable, never the key."""
    env = scorer.api_key_env
    where = f"the environment variable {env}" if env else "an environment variable"
    if scorer.pool.headers:
        return f"teacher server {ep.url} rejected the API key in {where} (HTTP 401): is it the server's --api-key?"
    return (f"teacher server {ep.url} requires an API key (HTTP 401): put its --api-key in {where} "
            f"(teacher.api_key_env names the variable)")


def _served_vocab(scorer, ep: Endpoint) -> int | None:
    """The served model's vocabulary size: ``prompt_logprobs=-1`` asks for all of it, which the server
    refuses naming the size (unless started with ``--max-logprobs -1``: then it is the entry count)."""
    body = {"model": scorer.model, "prompt": [0, 0], "max_tokens": 1, "prompt_logprobs": -1}
    try:
        out = scorer.pool.with_retries(ep, "/v1/completions", body)
    except Refused as e:
        m = re.search(r"prompt logprobs of (\d+)", str(e))
        return int(m.group(1)) if m else None
    try:
        return len(out["choices"][0]["prompt_logprobs"][1])   # all V (the actual token among them)
    except (KeyError, IndexError, TypeError):
        return None
