"""vLLM's OpenAI-compatible completions API as the served scorer uses it: the request, its answer's size cap,
and the answer's ``prompt_logprobs`` turned into the arrays the in-process scorer returns.

Per prompt position t = 1..L-1 (position 0 is ``null``) the server answers vLLM's *dict* form of the
``[actual token, top-1 .. top-K]`` block the in-process engine returns flat (``refine.scorers.vllm``): a JSON
object ``{"<id>": {"logprob", "rank", "decoded_token"}}`` built by inserting the actual token first and then the
top-K with ranks 1..K. When the actual token is also in the top-K the two collapse into one entry (K entries,
in insertion order, the actual token's rank overwritten by its top-K rank); otherwise there are K+1 and the
first is the actual token. So: the actual token's log-prob is the entry under its id; the top-K are the last K
entries when there are K+1, else all K, sorted by rank, which is exactly the in-process top-K order. The
server clamps ``-inf`` log-probs to -9999.0; they are turned back into ``-inf``. Log-probs travel as the
decimal repr of the engine's fp32 values, so they come back exactly. Every token id must be in the vocabulary.
"""

from __future__ import annotations

import numpy as np

from refine.core.errors import InputError

CLAMPED_NEG_INF = -9999.0        # what vLLM's server sends for a -inf log-prob
SMALL_RESPONSE = 4 << 20         # bytes: the cap on any answer's overhead (model list, tokenize, errors)
ENTRY_BYTES = 1024               # bytes per requested log-prob entry (vLLM's form needs far fewer)
PROBE_ENTRY_BYTES = 512          # per entry of the vocabulary probe (V of them: ~80 bytes each in vLLM's form)
SUM_TOLERANCE = 1e-3             # log of the largest total probability accepted at a position (fp error)


def completion_body(model: str | None, ids: list[int], top_k: int, bos_id: int | None) -> dict:
    """One row as a completion request: its ids (after BOS) as the prompt, ``prompt_logprobs=K``."""
    prefix = [] if bos_id is None else [bos_id]
    return {"model": model, "prompt": prefix + ids, "max_tokens": 1, "prompt_logprobs": top_k,
            "temperature": 0.0, "stream": False}


def response_cap(body: dict | None, vocab: int) -> int:
    """Largest answer read: room for every requested log-prob entry (1 KiB each), or 4 MiB for the small
    requests (model list, tokenize). The vocabulary probe (``prompt_logprobs=-1``: all V entries at each
    position but the first) gets 512 bytes an entry. An answer may hold ``cap / 32`` JSON values (16 an entry
    of the probe, 32 of a row: vLLM's form has 8; ``refine.scorers.http_pool``, checked before it is parsed),
    so parsing one costs a few times its cap, not the 24 times ``[{},{},...]`` would."""
    if not body or "prompt_logprobs" not in body:
        return SMALL_RESPONSE
    k = body["prompt_logprobs"]
    if k < 0:
        return SMALL_RESPONSE + PROBE_ENTRY_BYTES * max(len(body["prompt"]) - 1, 1) * (vocab + 2)
    return SMALL_RESPONSE + ENTRY_BYTES * (len(body["prompt"]) + 1) * (k + 2)


def parse_completion(out: dict, url: str, row: np.ndarray, k: int, bos_id: int | None,
                     vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One answer -> (token log-probs [L-1], top-K ids [L-1, K], top-K log-probs [L-1, K])."""
    length = len(row)
    try:
        positions = out["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise InputError(f"teacher server {url} answered without prompt_logprobs: is it vLLM?") from None
    skip = 1 + (bos_id is not None)      # position 0 has no context; with BOS, its prediction of x_0
    if not isinstance(positions, list) or len(positions) != length - 1 + skip:
        got = len(positions) if isinstance(positions, list) else type(positions).__name__
        raise InputError(f"teacher server {url} returned {got} prompt positions for a row of {length} tokens, "
                         f"expected {length - 1 + skip}")
    token = np.empty(length - 1, dtype=np.float32)
    ids = np.empty((length - 1, k), dtype=np.int32)
    lps = np.empty((length - 1, k), dtype=np.float32)
    outside = np.zeros(length - 1, dtype=bool)          # the actual token is not among the top-K there
    actual = row[1:].tolist()
    for t, pos in enumerate(positions[skip:]):
        try:
            _parse_position(url, vocab, t, pos, str(actual[t]), k, token, ids, lps, outside)
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
            raise InputError(f"teacher server {url} answered malformed prompt_logprobs at position {t + skip} "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if np.isnan(token).any() or np.isnan(lps).any() or (token > 1e-3).any() or (lps > 1e-3).any():
        raise InputError(f"teacher server {url} answered a NaN or positive log-prob")
    if k:
        # distinct tokens' probabilities add up to at most 1: K entries of log-prob 0 are no distribution
        total = np.exp(lps.astype(np.float64)).sum(axis=1) + np.where(outside, np.exp(token.astype(np.float64)), 0)
        bad = np.flatnonzero(np.log(total) > SUM_TOLERANCE)
        if bad.size:
            t = int(bad[0])
            raise InputError(f"teacher server {url} answered log-probs at position {t + skip} whose probabilities "
                             f"add up to {total[t]:.4g}, more than 1")
    for a in (token, lps):
        a[a == CLAMPED_NEG_INF] = -np.inf
    return token, ids, lps


def _token_id(key: str) -> int:
    """A token id as the server writes it: a canonical decimal (``"5"``, ``"-3"``; ``"05"``, ``"+5"``, ``" 5"``,
    ``"5_0"`` or ``"٥"`` name no token, though ``int`` takes them; ValueError for those)."""
    value = int(key) if isinstance(key, str) and key.isascii() and len(key) <= 20 else None
    if value is None or str(value) != key:
        raise ValueError(f"token id {str(key)[:20]!r} is not written as a decimal number")
    return value


def _parse_position(url: str, vocab: int, t: int, pos: dict, actual: str, k: int, token, ids, lps,
                    outside) -> None:
    entry = pos.get(actual)
    if entry is None:
        raise ValueError("log-probs for other tokens than the ones sent")
    token[t] = float(entry["logprob"])
    if k:
        items = list(pos.items())
        for key, _ in items:
            _token_id(key)
        if len(items) == k + 1:          # the actual token first, outside the top-K (or tied with it)
            items = items[1:]
            outside[t] = True
        elif len(items) != k:
            raise ValueError(f"{len(items)} log-probs at a position, expected {k} or {k + 1}")
        items.sort(key=lambda kv: int(kv[1]["rank"]))
        # checked as Python ints, before the int32 array could wrap a huge one
        row_ids = [int(i) for i, _ in items]           # (every key checked to be canonical above)
        bad = [i for i in row_ids if not 0 <= i < vocab]
        if bad:
            raise InputError(f"teacher server {url} answered token id {bad[0]}, outside the vocabulary "
                             f"0..{vocab - 1}")
        ids[t] = row_ids
        lps[t] = [float(v["logprob"]) for _, v in items]
