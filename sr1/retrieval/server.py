"""HTTP retrieval server speaking Search-R1's ``/retrieve`` protocol, over any Retriever.

``POST /retrieve`` ``{"queries": [...], "topk": 3, "return_scores": true}`` answers
``{"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}`` (bare documents
when ``return_scores`` is false, as Search-R1 does). ``GET /health`` says what is served.
Malformed requests get a 4xx with a JSON ``{"error": ...}`` and the server stays up.

Concurrent requests are merged: handler threads queue their cache misses and one batcher
thread runs them as a single ``Retriever.search`` call (bm25s and faiss are far faster per
query in batches). A bounded LRU cache of ``(query, k)`` results sits in front. Built on the
standard library's threading HTTP server, so tests can run it in a thread on a free port.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sr1.config import RetrievalConfig
from sr1.retrieval.base import Passage, Retriever

MAX_BODY_BYTES = 8 << 20


class RequestError(Exception):
    """A client error: becomes an HTTP 4xx with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
    """One thread that merges queued jobs (within ``wait_ms``) into single search calls."""

    def __init__(self, retriever: Retriever, max_batch: int, wait_ms: float) -> None:
        self.retriever = retriever
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0
        self.queries = 0
        self._thread = threading.Thread(target=self._run, name="sr1-retrieval-batcher", daemon=True)
        self._thread.start()

    def submit(self, queries: list[str], k: int) -> list[list[Passage]]:
        job = _Job(queries, k)
        self._q.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            first = self._q.get()
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
            self.batches += 1
            self.queries += len(flat)
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
        self.requests = 0
        self.rejected = 0

    def parse(self, body: bytes) -> tuple[list[str], int, bool]:
        """Validate a /retrieve body; raises RequestError with a message saying what is wrong."""
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
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
        if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
            raise RequestError(422, "'queries' must be a list of strings")
        if len(qs) > self.cfg.server_max_batch:
            raise RequestError(
                413, f"{len(qs)} queries in one request; the limit is {self.cfg.server_max_batch}"
            )
        k = req.get("topk", self.cfg.topk)
        if k is None:
            k = self.cfg.topk
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.cfg.server_max_topk:
            raise RequestError(
                422, f"'topk' must be an integer from 1 to {self.cfg.server_max_topk}"
            )
        scores = req.get("return_scores", False)
        if not isinstance(scores, bool):
            raise RequestError(422, "'return_scores' must be true or false")
        return qs, k, scores

    def retrieve(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-k per query: cached ones from the LRU cache, the rest in one batched search."""
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
            "cache": self.cache.stats(),
            "limits": {
                "max_batch": self.cfg.server_max_batch,
                "max_topk": self.cfg.server_max_topk,
            },
        }

    def close(self) -> None:
        self.batcher.close()


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
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send(413 if length > 0 else 400, {"error": "bad or oversize Content-Length"})
            return
        body = self.rfile.read(length) if length else b""
        if p != "/retrieve":
            self._send(404, {"error": f"no route {p}; use POST /retrieve or GET /health"})
            return
        try:
            self._send(200, self.server.app.handle_retrieve(body))
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
