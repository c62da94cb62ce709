"""A pool of HTTP endpoints for the served scorer: deadlines, capped answers, retries and failover.

Standard library only (``http.client``). Each request goes to the live endpoint with the fewest requests in
flight (round robin among equals). A connection error, timeout (a deadline for the whole request, not per
socket read) or 5xx/408/429 answer is retried with exponential backoff; then that endpoint is set aside for
``revive_after`` seconds and the request moves to another one. Proxies from the environment are not used
(teacher servers sit on the cluster's own network), redirects are not followed, and an answer is read up to
a cap sized by what was asked: a misbehaving server is one error line, never a hang or a memory blow-up.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from refine.core.errors import InputError
from refine.core.json_bounds import too_many_values

VALUE_BYTES = 32     # an answer of at most cap bytes may hold cap / 32 JSON values (vLLM's has ~1 per 7 bytes)


class Retryable(Exception):
    """A failure worth retrying: no connection, a timeout, a 5xx/408/429 answer, a cut-off body."""


class EndpointDown(Exception):
    """An endpoint failed every retry."""


class Refused(Exception):
    """A 4xx answer: the request itself is wrong (retrying will not help)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"HTTP {code}: {message}")
        self.code = code


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


class ServerPool:
    """The endpoints at ``urls``. ``cap_for(body)``: the largest answer read for a request; ``headers``: sent
    with every request (the API key); ``quiet``: no warning when an endpoint is set aside."""

    def __init__(self, urls: list[str], timeout: float, retries: int, backoff: float, revive_after: float,
                 cap_for: Callable[[dict | None], int], headers: dict[str, str], quiet: bool):
        self.endpoints = [Endpoint(u) for u in dict.fromkeys(normalize_url(u) for u in urls)]
        self.timeout, self.retries, self.backoff, self.revive_after = float(timeout), int(retries), backoff, \
            revive_after
        self.cap_for, self.headers, self.quiet = cap_for, headers, quiet
        self.lock = threading.Lock()
        self._turn = itertools.count()

    def http(self, ep: Endpoint, path: str, body: dict | None = None) -> dict:
        """One request; ``Retryable`` for transient failures, ``Refused`` when the server refuses it.

        ``timeout`` is a deadline for the whole request (a timer shuts the socket, so a server dripping a byte
        at a time cannot stretch it), and JSON nested too deeply for the parser is a bad answer like any other."""
        data = None if body is None else json.dumps(body).encode()
        cap = self.cap_for(body)
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
            try:
                conn.request("GET" if body is None else "POST", parts.path + path, body=data,
                             headers={"Content-Type": "application/json", "Accept": "application/json",
                                      **self.headers})
            except ValueError:       # http.client's text for a bad header value holds the value: the API key
                raise InputError(f"cannot send a request to {ep.url}: a header holds characters HTTP cannot "
                                 f"carry (its value is not shown)") from None
            resp = conn.getresponse()
            raw = self._read_capped(resp, ep, path, cap)
        except (OSError, http.client.HTTPException) as e:   # refused, reset, timeout, cut off, shut at the deadline
            timed_out = expired.is_set() or isinstance(e, (TimeoutError, socket.timeout))
            raise Retryable("timed out" if timed_out else str(e) or type(e).__name__) from None
        finally:
            timer.cancel()
            if resp is not None:
                resp.close()                              # (its file keeps the socket open otherwise)
            conn.close()
        if expired.is_set():
            raise Retryable("timed out")
        return _answer(resp, raw, cap)

    @staticmethod
    def _read_capped(resp, ep: Endpoint, path: str, cap: int) -> bytes:
        chunks, size = [], 0
        while chunk := resp.read1(1 << 16):
            size += len(chunk)
            if size > cap:
                raise InputError(f"teacher server {ep.url} answered {path} with more than {cap:,} bytes (the "
                                 f"cap for this request); not read further")
            chunks.append(chunk)
        return b"".join(chunks)

    def with_retries(self, ep: Endpoint, path: str, body: dict | None = None) -> dict:
        for attempt in range(self.retries + 1):
            try:
                return self.http(ep, path, body)
            except Retryable as e:
                if attempt == self.retries:
                    raise EndpointDown(f"{e} (after {self.retries + 1} attempts)") from None
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _pick(self, tried: set[str]) -> Endpoint | None:
        now = time.monotonic()
        with self.lock:
            live = [e for e in self.endpoints if e.url not in tried
                    and (e.down_since is None or now - e.down_since >= self.revive_after)]
            if not live:
                return None
            turn = next(self._turn)
            n = len(live)
            ep = min((live[(turn + i) % n] for i in range(n)), key=lambda e: e.inflight)
            ep.inflight += 1
            return ep

    def request(self, path: str, body: dict) -> tuple[dict, str]:
        """POST ``body`` to the least-loaded live endpoint, failing over to the others; (answer, its URL)."""
        tried: set[str] = set()
        while True:
            ep = self._pick(tried)
            if ep is None:
                raise InputError("no teacher server answers: " + "; ".join(
                    f"{e.url}: {e.reason or 'set aside after an earlier failure'}" for e in self.endpoints))
            try:
                out = self.with_retries(ep, path, body)
                with self.lock:
                    ep.down_since, ep.reason = None, ""
                return out, ep.url
            except EndpointDown as e:
                with self.lock:
                    if ep.down_since is None and not self.quiet:
                        print(f"warning: teacher server {ep.url} set aside: {e}", file=sys.stderr, flush=True)
                    ep.down_since, ep.reason = time.monotonic(), str(e)
                tried.add(ep.url)
            except Refused as e:
                raise InputError(f"teacher server {ep.url} refused the request: {e}") from None
            finally:
                with self.lock:
                    ep.inflight -= 1


def _answer(resp, raw: bytes, cap: int) -> dict:
    """A finished answer: its JSON object, or ``Refused`` / ``Retryable`` by its status and body. It may hold
    ``cap / VALUE_BYTES`` JSON values, counted before it is parsed (``refine.core.json_bounds``): the cap bounds
    what parsing it costs, not only its bytes."""
    if too_many_values(raw, cap // VALUE_BYTES):
        raise Retryable(f"JSON of more than {cap // VALUE_BYTES:,} values ({len(raw):,} bytes), not parsed")
    if resp.status >= 300:
        if 300 <= resp.status < 400:
            raise Refused(resp.status, f"a redirect to {resp.getheader('Location')!r}, not followed")
        try:
            detail = json.loads(raw).get("error", {})
            msg = detail.get("message", "") if isinstance(detail, dict) else str(detail)
        except (ValueError, RecursionError, AttributeError):
            msg = ""
        msg = " ".join(str(msg).split())[:500]        # one line, whatever the server sends
        if resp.status >= 500 or resp.status in (408, 429):
            raise Retryable(f"HTTP {resp.status} {msg}".strip())
        raise Refused(resp.status, msg or resp.reason)
    try:
        out = json.loads(raw)
    except (ValueError, RecursionError) as e:
        what = "JSON nested too deeply" if isinstance(e, RecursionError) else "not JSON"
        raise Retryable(f"{what} ({len(raw)} bytes)") from None
    if not isinstance(out, dict):
        raise Retryable(f"a JSON {type(out).__name__}, not an object")
    return out
