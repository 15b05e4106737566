"""HTTP retrieval server speaking Search-R1's ``/retrieve`` protocol, over any Retriever.

``POST /retrieve`` ``{"queries": [...], "topk": 3, "return_scores": true}`` answers
``{"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}`` (bare documents
when ``return_scores`` is false, as Search-R1 does). ``GET /health`` says what is served and
the limits below. Malformed requests get a 4xx with a JSON ``{"error": ...}`` that says what to
change, and the server stays up.

The body is read like Search-R1's FastAPI model ``queries: List[str]; topk: Optional[int] = None;
return_scores: bool = False`` in pydantic v2's default (lax) mode, then
``if not request.topk: request.topk = <server default>``:

* ``queries``: a JSON list of strings (numbers and nulls inside it are refused, as pydantic does).
* ``topk``: missing, ``null``, ``0`` (or ``false``, ``"0"``) mean the server's default
  (``retrieval.topk``). Accepted as pydantic accepts an int: integers, ``true`` (= 1), floats
  with no fractional part (``3.0``), and strings of ASCII digits with optional sign, ``_``
  separators, surrounding whitespace and a ``.0`` tail (``"3"``, ``" 3 "``, ``"3.0"``).
  Refused (422): ``3.5``, ``"abc"``, ``"1e3"``, non-finite or out-of-int64 floats, lists.
  Negative topk is refused (422; Search-R1 would pass it to the retriever and fail). A topk
  over ``retrieval.server_max_topk`` (default 100) is clamped to it, and to the corpus size.
* ``return_scores``: pydantic's lax bool: ``true``/``false``, ``0``/``1``, ``0.0``/``1.0``, or
  one of the strings ``true false yes no on off t f y n 1 0`` in any case. ``null`` is refused.
* Other keys are ignored, as pydantic does by default.

Limits (``RetrievalConfig``; change with ``--set retrieval.NAME=VALUE``): a request carries at
most ``server_max_queries`` queries (default 16,384) in at most ``server_max_body_mb`` MiB
(default 64); over either it gets a 413 saying so. A GRPO turn (512 prompts x 5 samples = 2,560
queries) is answered in one request: memory is bounded by searching the request's queries in
chunks of ``server_max_batch`` (default 512, Search-R1's dense retrieval batch size), never by
refusing the request.

Concurrent requests are merged: handler threads queue their cache misses and one batcher
thread runs them as ``Retriever.search`` calls of at most ``server_max_batch`` queries (bm25s
and faiss are far faster per query in batches). A bounded LRU cache of ``(query, k)`` results
sits in front. Built on the standard library's threading HTTP server, so tests can run it in a
thread on a free port.
"""

from __future__ import annotations

import json
import math
import queue
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sr1.config import RetrievalConfig
from sr1.retrieval.base import Passage, Retriever

# pydantic v2 lax str -> int: ASCII digits, optional sign, single "_" between digits, ".0..." tail.
_INT_STR = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_I64 = 2**63


class RequestError(Exception):
    """A client error: becomes an HTTP 4xx with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def lax_int(v: Any) -> int | None:
    """``v`` as pydantic v2 (lax mode) validates ``Optional[int]``; None when it would refuse."""
    if isinstance(v, bool | int):
        return int(v)
    if isinstance(v, float):
        if math.isfinite(v) and v.is_integer() and -_I64 < v < _I64:
            return int(v)
        return None
    if isinstance(v, str):
        s = v.strip()
        if _INT_STR.fullmatch(s):
            digits = s.split(".", 1)[0].replace("_", "")
            if len(digits) > 40:  # beyond int() string limits; clamped later anyway
                return -(_I64**2) if digits[0] == "-" else _I64**2
            return int(digits)
    return None


def lax_bool(v: Any) -> bool | None:
    """``v`` as pydantic v2 (lax mode) validates ``bool``; None when it would refuse."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        s = v.lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    return None


class LRUCache:
    """Thread-safe bounded map from ``(query, k)`` to passages; size 0 disables it."""

    def __init__(self, size: int) -> None:
        self.size = max(0, int(size))
        self._d: OrderedDict[tuple[str, int], list[Passage]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int]) -> list[Passage] | None:
        if not self.size:
            return None
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: tuple[str, int], value: list[Passage]) -> None:
        if not self.size:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {
            "size": len(self._d),
            "capacity": self.size,
            "hits": self.hits,
            "misses": self.misses,
        }


@dataclass
class _Job:
    queries: list[str]
    k: int
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[Passage]] | None = None
    error: BaseException | None = None


class Batcher:
    """One thread running queued jobs as search calls of at most ``max_batch`` queries.

    A request's queries are split into jobs of at most ``max_batch``; jobs queued together
    (within ``wait_ms``) are merged while they fit, so no single ``Retriever.search`` call
    (and so no encoder batch or score matrix) grows with the request.
    """

    def __init__(self, retriever: Retriever, max_batch: int, wait_ms: float) -> None:
        self.retriever = retriever
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0
        self.queries = 0
        self.largest = 0
        self._thread = threading.Thread(target=self._run, name="sr1-retrieval-batcher", daemon=True)
        self._thread.start()

    def submit(self, queries: list[str], k: int) -> list[list[Passage]]:
        jobs = [
            _Job(queries[i : i + self.max_batch], k) for i in range(0, len(queries), self.max_batch)
        ]
        for job in jobs:
            self._q.put(job)
        out: list[list[Passage]] = []
        for job in jobs:
            job.done.wait()
        for job in jobs:
            if job.error is not None:
                raise job.error
            assert job.result is not None
            out += job.result
        return out

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        carry: _Job | None = None  # a job that did not fit the previous batch
        while True:
            first, carry = (carry, None) if carry is not None else (self._q.get(), None)
            if first is None:
                return
            jobs, n = [first], len(first.queries)
            deadline = time.monotonic() + self.wait_s
            stop = False
            while n < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    # wait_ms 0: take what is queued now; requests arriving during this search
                    # queue up and form the next batch, so a lone request never waits.
                    nxt = self._q.get(timeout=timeout) if timeout > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if n + len(nxt.queries) > self.max_batch:
                    carry = nxt
                    break
                jobs.append(nxt)
                n += len(nxt.queries)
            self._execute(jobs)
            if stop:
                return

    def _execute(self, jobs: list[_Job]) -> None:
        k = max(j.k for j in jobs)
        flat = [q for j in jobs for q in j.queries]
        try:
            res = self.retriever.search(flat, k) if flat else []
            if len(res) != len(flat):
                raise RuntimeError(f"retriever returned {len(res)} results for {len(flat)}")
            self.batches += 1
            self.queries += len(flat)
            self.largest = max(self.largest, len(flat))
            i = 0
            for j in jobs:
                j.result = [r[: j.k] for r in res[i : i + len(j.queries)]]
                i += len(j.queries)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request threads
            for j in jobs:
                j.error = e
        for j in jobs:
            j.done.set()


class RetrievalApp:
    """The protocol logic, independent of the HTTP transport: request dict -> response dict."""

    def __init__(self, retriever: Retriever, cfg: RetrievalConfig | None = None) -> None:
        self.cfg = cfg or RetrievalConfig()
        self.retriever = retriever
        self.cache = LRUCache(self.cfg.server_cache_size)
        self.batcher = Batcher(retriever, self.cfg.server_max_batch, self.cfg.server_batch_wait_ms)
        self.description = retriever.describe()
        self.default_topk = max(1, self.cfg.topk)
        self.max_queries = max(1, self.cfg.server_max_queries)
        self.max_body_bytes = max(1, self.cfg.server_max_body_mb) << 20
        passages = self.description.get("passages")
        self.max_topk = max(1, self.cfg.server_max_topk)
        if isinstance(passages, int) and passages > 0:
            self.max_topk = min(self.max_topk, passages)
        self.requests = 0
        self.rejected = 0

    def body_too_large(self, n: int) -> str:
        return (
            f"request body is {n} bytes; this server takes at most {self.max_body_bytes} "
            f"(retrieval.server_max_body_mb={self.cfg.server_max_body_mb}): send the queries "
            "in several requests, or restart the server with "
            "--set retrieval.server_max_body_mb=N"
        )

    def parse(self, body: bytes) -> tuple[list[str], int, bool]:
        """Validate a /retrieve body like Search-R1's pydantic model (see the module docstring).

        Returns ``(queries, k, return_scores)`` with ``k`` defaulted and clamped; raises
        RequestError with a message saying what is wrong.
        """
        if len(body) > self.max_body_bytes:
            raise RequestError(413, self.body_too_large(len(body)))
        try:
            req = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"body is not valid JSON ({e})") from None
        if not isinstance(req, dict):
            raise RequestError(
                422, 'body must be a JSON object like {"queries": ["..."], "topk": 3}'
            )
        if "queries" not in req:
            raise RequestError(422, "missing 'queries' (a list of strings)")
        qs = req["queries"]
        if not isinstance(qs, list):
            raise RequestError(422, f"'queries' must be a list of strings, not {_kind(qs)}")
        bad = next((i for i, q in enumerate(qs) if not isinstance(q, str)), None)
        if bad is not None:
            raise RequestError(
                422,
                f"'queries' must be a list of strings; item {bad} is {_kind(qs[bad])}",
            )
        if len(qs) > self.max_queries:
            raise RequestError(
                413,
                f"{len(qs)} queries in one request; this server takes at most "
                f"{self.max_queries} (retrieval.server_max_queries): split them over "
                "several requests, or restart the server with "
                "--set retrieval.server_max_queries=N",
            )
        raw_k = req.get("topk")
        k = lax_int(raw_k) if raw_k is not None else 0
        if k is None:
            raise RequestError(
                422,
                f"'topk' must be an integer (got {json.dumps(raw_k)[:40]}); "
                f"omit it, or send null or 0, for the server default of {self.default_topk}",
            )
        if k < 0:
            raise RequestError(
                422,
                f"'topk' must not be negative (got {k}); omit it, or send null or 0, "
                f"for the server default of {self.default_topk}",
            )
        k = min(k or self.default_topk, self.max_topk)  # Search-R1: `if not request.topk`
        raw_scores = req.get("return_scores", False)
        scores = lax_bool(raw_scores)
        if scores is None:
            raise RequestError(
                422, f"'return_scores' must be true or false (got {json.dumps(raw_scores)[:40]})"
            )
        return qs, k, scores

    def retrieve(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-k per query: cached ones from the LRU cache, the rest batched by the Batcher."""
        out: list[list[Passage] | None] = [self.cache.get((q, k)) for q in queries]
        miss_idx = [i for i, r in enumerate(out) if r is None]
        if miss_idx:
            uniq = list(dict.fromkeys(queries[i] for i in miss_idx))
            found = dict(zip(uniq, self.batcher.submit(uniq, k), strict=True))
            for q, r in found.items():
                self.cache.put((q, k), r)
            for i in miss_idx:
                out[i] = found[queries[i]]
        return [r or [] for r in out]

    def handle_retrieve(self, body: bytes) -> dict[str, Any]:
        self.requests += 1
        try:
            qs, k, with_scores = self.parse(body)
        except RequestError:
            self.rejected += 1
            raise
        res = self.retrieve(qs, k)
        if with_scores:
            return {
                "result": [[{"document": p.to_dict(), "score": p.score} for p in r] for r in res]
            }
        return {"result": [[p.to_dict() for p in r] for r in res]}

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "retriever": self.description,
            "requests": self.requests,
            "rejected": self.rejected,
            "batches": self.batcher.batches,
            "queries_searched": self.batcher.queries,
            "largest_batch": self.batcher.largest,
            "cache": self.cache.stats(),
            "limits": {
                "default_topk": self.default_topk,
                "max_topk": self.max_topk,
                "max_queries": self.max_queries,
                "max_body_bytes": self.max_body_bytes,
                "max_batch": self.batcher.max_batch,
            },
        }

    def close(self) -> None:
        self.batcher.close()


def _kind(v: Any) -> str:
    """A JSON value's type in words, for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return f"a number ({v})"
    if isinstance(v, str):
        return "a string"
    return "an object" if isinstance(v, dict) else "a list"


def make_app(retriever: Retriever, cfg: RetrievalConfig | None = None) -> RetrievalApp:
    """The retrieval service for ``retriever`` (serve it with :func:`make_server`)."""
    return RetrievalApp(retriever, cfg)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, keep-alive clients wait ~40 ms
    # for a delayed ACK on every request.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        p = self._path()
        if p in ("/health", "/"):
            self._send(200, self.server.app.health())
        elif p == "/retrieve":
            self._send(405, {"error": "use POST /retrieve with a JSON body"})
        else:
            self._send(404, {"error": f"no route {p}; use POST /retrieve or GET /health"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        p = self._path()
        app = self.server.app
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._send(411, {"error": "chunked bodies are not supported; send Content-Length"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(400, {"error": "bad Content-Length header"})
            return
        if length > app.max_body_bytes:
            # Read (and drop) a moderately oversize body so the client gets this answer rather
            # than a connection reset; past 4x the limit just answer and hang up.
            if length <= 4 * app.max_body_bytes:
                left = length
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                    left -= len(chunk)
            self.close_connection = True
            self._send(413, {"error": app.body_too_large(length)})
            return
        body = self.rfile.read(length) if length else b""
        if p != "/retrieve":
            self._send(404, {"error": f"no route {p}; use POST /retrieve or GET /health"})
            return
        try:
            self._send(200, app.handle_retrieve(body))
        except RequestError as e:
            self._send(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a failed search must not take the server down
            self._send(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": f"search failed: {type(e).__name__}: {e}"},
            )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's listen backlog of 5 resets connections when many rollout workers (or a
    # test's 16 threads) connect at once; the kernel caps this at net.core.somaxconn.
    request_queue_size = 1024

    def __init__(self, addr: tuple[str, int], app: RetrievalApp, verbose: bool) -> None:
        self.app = app
        self.verbose = verbose
        super().__init__(addr, _Handler)


def make_server(
    app: RetrievalApp, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False
) -> ThreadingHTTPServer:
    """A threading HTTP server for ``app``; port 0 picks a free port (``server.server_port``)."""
    return _Server((host, port), app, verbose)


class BackgroundServer:
    """Run a server in a daemon thread (tests, benchmarks); ``url`` is its base address."""

    def __init__(
        self,
        retriever: Retriever,
        cfg: RetrievalConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.app = make_app(retriever, cfg)
        self.server = make_server(self.app, host, port)
        self.url = f"http://{host}:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.close()
        self._thread.join(timeout=5)
