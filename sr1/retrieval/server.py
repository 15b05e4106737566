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
  Refused (422): ``3.5``, ``"abc"``, ``"1e3"``, non-finite or out-of-int64 floats (``1e400``),
  lists. Negative topk is refused (422; Search-R1 would pass it to the retriever and fail). A
  topk over ``retrieval.server_max_topk`` (default 100) is clamped to it, and to the corpus
  size; so is an integer of any length (``99999999999999999999999``, or 5,000 digits).
* ``return_scores``: pydantic's lax bool: ``true``/``false``, ``0``/``1``, ``0.0``/``1.0``, or
  one of the strings ``true false yes no on off t f y n 1 0`` in any case. ``null`` is refused.
* Other keys are ignored, as pydantic does by default. A body nested too deeply for the JSON
  parser (``[[[[...]]]]``) is a 400, like any other invalid JSON.

Limits (``RetrievalConfig``; change with ``--set retrieval.NAME=VALUE``): a request carries at
most ``server_max_queries`` queries (default 16,384) in at most ``server_max_body_mb`` MiB
(default 64); over either it gets a 413 saying so. A GRPO turn (512 prompts x 5 samples = 2,560
queries) is answered in one request. A query longer than ``server_max_query_chars`` (4,096)
characters is cut to that length and searched (not refused, so one degenerate query cannot
fail a whole rollout batch); the response then carries ``X-Sr1-Truncated-Queries: N``.

Transport: uvicorn (httptools parser when installed, else h11) serving a Starlette app on one
asyncio event loop. A request (headers and body) must arrive whole within
``server_read_timeout_s`` (30) of its first byte or of the connection opening, and a client
must not leave a response unread that long: else the connection is closed (with a 408 when a
request was half sent). Request headers are capped at 64 KiB (431). Idle keep-alive connections
close after ``server_keep_alive_s`` (5). Beyond ``server_max_connections`` (512) open
connections new requests get a 503 (uvicorn's ``limit_concurrency``); ``server_backlog`` (1024)
is the listen backlog.

Searches run in one worker thread, so the event loop never blocks on them. Requests queue
their cache misses; each search call takes queries round-robin from all waiting requests, at
most ``server_max_batch`` (512) queries and 256 characters per query slot of text, so a
2,560-query request and a 1-query request arriving during it share the next search and the
small one is answered after one chunk, not after the whole big request. bm25s and faiss are far
faster per query in batches, and memory is bounded by the chunk, not the request. A (query, k)
LRU cache bounded by ``server_cache_mb`` MiB (256; sizes estimated from the texts) sits in
front. Tests and benchmarks run it in a thread on a free port (:class:`BackgroundServer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sr1.config import RetrievalConfig
from sr1.errors import Sr1Error
from sr1.net import bind_socket  # noqa: F401  (re-exported: sr1 serve, tests)
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


# Query text per search-call slot: a search call carries at most server_max_batch queries and
# server_max_batch * this many characters, so long queries make smaller calls, not slower ones.
BATCH_CHARS_PER_QUERY = 256
MAX_HEADER_BYTES = 64 << 10  # request line and headers (431 above)
SHUTDOWN_GRACE_S = 5  # on stop, in-flight requests get this long before they are cancelled
_INLINE_BODY_BYTES = 256 << 10  # larger bodies are parsed off the event loop
_BIG_INT_DIGITS = 40  # JSON integers longer than this read as +-2**126 (clamped or refused)


def _dumps_json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


try:
    import orjson

    def dumps(obj: Any) -> bytes:
        """Compact UTF-8 JSON, as FastAPI's JSONResponse writes it (orjson: same bytes for
        these responses, ~30x faster than json for a 64-query answer)."""
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

except ImportError:  # pragma: no cover - orjson is a dependency; json is the fallback
    dumps = _dumps_json


# Larger responses (passages) are serialised off the event loop (orjson: ~2 ms per 10,000).
_INLINE_PASSAGES = 2048 if dumps is _dumps_json else 16384


def _json_int(s: str) -> int:
    """``json.loads``' integer hook: no ``int()`` digit-limit error (a 500) on huge literals."""
    if len(s) > _BIG_INT_DIGITS:
        return -(_I64**2) if s[0] == "-" else _I64**2
    return int(s)


def entry_bytes(query: str, passages: list[Passage]) -> int:
    """Estimated memory of one cache entry: the key, the result list and the passages' texts."""
    n = 250 + sys.getsizeof(query) + 8 * len(passages)  # dict slot, key tuple, list, k
    for p in passages:
        n += 200 + sys.getsizeof(p.contents) + sys.getsizeof(p.id)  # object, float, strings
    return n


class LRUCache:
    """Thread-safe LRU map from ``(query, k)`` to passages, bounded by estimated bytes.

    ``max_bytes`` 0 disables it; an entry larger than the whole budget is not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._d: OrderedDict[tuple[str, int], tuple[list[Passage], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: tuple[str, int]) -> list[Passage] | None:
        if not self.max_bytes:
            return None
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v[0]

    def put(self, key: tuple[str, int], value: list[Passage]) -> None:
        if not self.max_bytes:
            return
        n = entry_bytes(key[0], value)
        if n > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._d[key] = (value, n)
            self.bytes += n
            while self.bytes > self.max_bytes:
                _, (_, m) = self._d.popitem(last=False)
                self.bytes -= m
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._d)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._d),
            "bytes": self.bytes,
            "capacity_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


class ServerStopping(RuntimeError):
    """The server shut down while a request waited for its search (a 503)."""


@dataclass(eq=False)
class _Ticket:
    """One request's cache misses waiting in the batcher."""

    queries: list[str]
    k: int
    future: asyncio.Future[list[list[Passage]]]
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # queries handed to search calls so far
    answered: int = 0


class Batcher:
    """Merges waiting requests' queries into ``Retriever.search`` calls run in one thread.

    Lives on the server's event loop (:meth:`start` there). Each call takes queries
    round-robin from the waiting requests, at most ``max_batch`` of them and ``max_chars``
    characters (at least one query), so no single call (encoder batch, score matrix) grows with
    a request, and a small request is never queued behind all of a big one. Requests that
    arrive while a search runs form the next call; ``wait_ms`` adds a wait before the first.
    """

    def __init__(
        self, retriever: Retriever, max_batch: int, wait_ms: float, max_chars: int | None = None
    ) -> None:
        self.retriever = retriever
        self.max_batch = max(1, max_batch)
        self.max_chars = max(1, max_chars or self.max_batch * BATCH_CHARS_PER_QUERY)
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self._pending: deque[_Ticket] = deque()
        self._inflight: list[_Ticket] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.queries = 0
        self.largest = 0

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sr1-retrieval-search")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sr1-batcher")
        self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """The batching task ended (stop, or a bug): no waiting request may hang on it."""
        err = None if task.cancelled() else task.exception()
        for t in [*self._pending, *self._inflight]:
            if not t.future.done():
                t.future.set_exception(
                    ServerStopping("the retrieval server is stopping")
                    if err is None
                    else RuntimeError(f"the request batcher failed: {type(err).__name__}: {err}")
                )
        self._pending.clear()
        self._inflight = []

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-k per query, searched together with other waiting requests' queries."""
        if not queries:
            return []
        if self._task is None or self._task.done() or self._wake is None:
            raise ServerStopping("the retrieval server is stopping")
        t = _Ticket(queries, k, asyncio.get_running_loop().create_future())
        t.results = [None] * len(queries)
        self._pending.append(t)
        self._wake.set()
        return await t.future

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> list[tuple[_Ticket, int, int]]:
        """The next search call: ``(ticket, first query, count)`` slices, round-robin."""
        live = [t for t in self._pending if not t.future.done() and t.taken < len(t.queries)]
        counts = self._shares([len(t.queries) - t.taken for t in live])
        chars = sum(
            sum(map(len, t.queries[t.taken : t.taken + c]))
            for t, c in zip(live, counts, strict=True)
        )
        if chars > self.max_chars and sum(counts) > 1:
            counts = self._shares_by_chars(live)
        batch = []
        for t, c in zip(live, counts, strict=True):
            if c:
                batch.append((t, t.taken, c))
                t.taken += c
        rest = deque(t for t in live if t.taken < len(t.queries))
        if rest and rest[0] is live[0]:
            rest.rotate(-1)  # the next call starts with the next request
        self._pending = rest
        return batch

    def _shares(self, left: list[int]) -> list[int]:
        """Round-robin counts for requests with ``left`` queries each, ``max_batch`` in all."""
        counts = [0] * len(left)
        room = self.max_batch
        active = [i for i, n in enumerate(left) if n]
        while room and active:
            share = max(1, room // len(active))
            still = []
            for i in active:
                c = min(share, left[i] - counts[i], room)
                counts[i] += c
                room -= c
                if counts[i] < left[i]:
                    still.append(i)
                if not room:
                    break
            active = still
        return counts

    def _shares_by_chars(self, live: list[_Ticket]) -> list[int]:
        """Round-robin one query at a time within ``max_chars`` (long queries: fewer of them)."""
        counts = [0] * len(live)
        n = chars = 0
        active = list(range(len(live)))
        while active:
            still = []
            for i in active:
                t = live[i]
                q = t.queries[t.taken + counts[i]]
                if n >= self.max_batch or (n and chars + len(q) > self.max_chars):
                    return counts
                counts[i] += 1
                n += 1
                chars += len(q)
                if t.taken + counts[i] < len(t.queries):
                    still.append(i)
            active = still
        return counts

    def _search(self, flat: list[str], k: int) -> list[list[Passage]]:
        res = self.retriever.search(flat, k)
        if len(res) != len(flat):
            raise RuntimeError(f"retriever returned {len(res)} results for {len(flat)}")
        return res

    async def _run(self) -> None:
        assert self._wake is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.wait_s:
                await asyncio.sleep(self.wait_s)
            while batch := self._take():
                flat = [q for t, i, c in batch for q in t.queries[i : i + c]]
                k = max(t.k for t, _, _ in batch)
                self._inflight = [t for t, _, _ in batch]
                try:
                    res = await loop.run_in_executor(self._executor, self._search, flat, k)
                except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                    for t, _, _ in batch:
                        if not t.future.done():
                            t.future.set_exception(e)
                    continue
                finally:
                    self._inflight = []
                self.batches += 1
                self.queries += len(flat)
                self.largest = max(self.largest, len(flat))
                off = 0
                for t, i, c in batch:
                    if not t.future.done():
                        rows = res[off : off + c]
                        t.results[i : i + c] = rows if t.k >= k else [r[: t.k] for r in rows]
                        t.answered += c
                        if t.answered == len(t.queries):
                            t.future.set_result(t.results)
                    off += c


class RetrievalApp:
    """The protocol logic, independent of the HTTP transport: request body -> response body."""

    def __init__(self, retriever: Retriever, cfg: RetrievalConfig | None = None) -> None:
        self.cfg = cfg or RetrievalConfig()
        self.retriever = retriever
        self.cache = LRUCache(self.cfg.server_cache_mb << 20)
        self.batcher = Batcher(retriever, self.cfg.server_max_batch, self.cfg.server_batch_wait_ms)
        self.description = retriever.describe()
        self.default_topk = max(1, self.cfg.topk)
        self.max_queries = max(1, self.cfg.server_max_queries)
        self.max_body_bytes = max(1, self.cfg.server_max_body_mb) << 20
        self.max_query_chars = max(1, self.cfg.server_max_query_chars)
        passages = self.description.get("passages")
        self.max_topk = max(1, self.cfg.server_max_topk)
        if isinstance(passages, int) and passages > 0:
            self.max_topk = min(self.max_topk, passages)
        self.requests = 0
        self.rejected = 0
        self.truncated = 0
        self._io = ThreadPoolExecutor(2, thread_name_prefix="sr1-retrieval-json")

    def body_too_large(self, n: int, at_least: bool = False) -> str:
        return (
            f"request body is {'over ' if at_least else ''}{n} bytes; this server takes at most "
            f"{self.max_body_bytes} (retrieval.server_max_body_mb={self.cfg.server_max_body_mb}): "
            "send the queries in several requests, or restart the server with "
            "--set retrieval.server_max_body_mb=N"
        )

    def parse(self, body: bytes) -> tuple[list[str], int, bool, int]:
        """Validate a /retrieve body like Search-R1's pydantic model (see the module docstring).

        Returns ``(queries, k, return_scores, truncated)``: queries cut to
        ``server_max_query_chars`` (``truncated`` of them were longer), ``k`` defaulted and
        clamped. Raises RequestError with a message saying what is wrong.
        """
        if len(body) > self.max_body_bytes:
            raise RequestError(413, self.body_too_large(len(body)))
        try:
            req = json.loads(body or b"null", parse_int=_json_int)
        except RecursionError:
            raise RequestError(400, "body is not valid JSON (nested too deeply)") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
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
        cap = self.max_query_chars
        cut = sum(len(q) > cap for q in qs)
        if cut:
            qs = [q[:cap] for q in qs]
        return qs, k, scores, cut

    async def retrieve(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-k per query: cached ones from the LRU cache, the rest batched by the Batcher."""
        out: list[list[Passage] | None] = [self.cache.get((q, k)) for q in queries]
        miss_idx = [i for i, r in enumerate(out) if r is None]
        if miss_idx:
            uniq = list(dict.fromkeys(queries[i] for i in miss_idx))
            found = dict(zip(uniq, await self.batcher.search(uniq, k), strict=True))
            for q, r in found.items():
                self.cache.put((q, k), r)
            for i in miss_idx:
                out[i] = found[queries[i]]
        return [r or [] for r in out]

    @staticmethod
    def render(res: list[list[Passage]], with_scores: bool) -> bytes:
        """The response body, as FastAPI's JSONResponse writes it (compact, UTF-8)."""
        if with_scores:
            obj: dict[str, Any] = {
                "result": [
                    [
                        {"document": {"id": p.id, "contents": p.contents}, "score": p.score}
                        for p in r
                    ]
                    for r in res
                ]
            }
        else:
            obj = {"result": [[{"id": p.id, "contents": p.contents} for p in r] for r in res]}
        return dumps(obj)

    async def handle_retrieve(self, body: bytes) -> tuple[bytes, dict[str, str]]:
        """A /retrieve body -> (response body, extra headers); RequestError for a 4xx.

        Big bodies are parsed, and big responses written, in a helper thread so the event loop
        keeps serving other connections meanwhile.
        """
        self.requests += 1
        loop = asyncio.get_running_loop()
        try:
            if len(body) > _INLINE_BODY_BYTES:
                qs, k, with_scores, cut = await loop.run_in_executor(self._io, self.parse, body)
            else:
                qs, k, with_scores, cut = self.parse(body)
        except RequestError:
            self.rejected += 1
            raise
        self.truncated += cut
        res = await self.retrieve(qs, k)
        if len(res) * k > _INLINE_PASSAGES:
            data = await loop.run_in_executor(self._io, self.render, res, with_scores)
        else:
            data = self.render(res, with_scores)
        return data, ({"X-Sr1-Truncated-Queries": str(cut)} if cut else {})

    def health(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "status": "ok",
            "retriever": self.description,
            "requests": self.requests,
            "rejected": self.rejected,
            "truncated_queries": self.truncated,
            "batches": self.batcher.batches,
            "queries_searched": self.batcher.queries,
            "largest_batch": self.batcher.largest,
            "cache": self.cache.stats(),
            "limits": {
                "default_topk": self.default_topk,
                "max_topk": self.max_topk,
                "max_queries": self.max_queries,
                "max_body_bytes": self.max_body_bytes,
                "max_query_chars": self.max_query_chars,
                "max_batch": self.batcher.max_batch,
                "max_batch_chars": self.batcher.max_chars,
                "max_header_bytes": MAX_HEADER_BYTES,
                "read_timeout_s": cfg.server_read_timeout_s,
                "keep_alive_s": cfg.server_keep_alive_s,
                "max_connections": cfg.server_max_connections,
                "backlog": cfg.server_backlog,
            },
        }

    def close(self) -> None:
        self.batcher.close()
        self._io.shutdown(wait=False, cancel_futures=True)


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


def _json_response(status: int, obj: dict[str, Any], close: bool = False) -> Response:
    headers = {"Connection": "close"} if close else None
    data = dumps(obj)
    return Response(data, status_code=status, media_type="application/json", headers=headers)


class _Disconnected(Exception):
    pass


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; _Disconnected if the client (or the read timeout) hangs up."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            raise _Disconnected
        if body := msg.get("body", b""):
            yield body
        if not msg.get("more_body", False):
            return


async def _read_body(request: Request, app: RetrievalApp) -> bytes | Response:
    """The body, or the 413 answer when it is over ``server_max_body_mb``.

    A moderately oversize body (up to 4x the limit) is read and dropped first, so the client
    gets the 413 rather than a connection reset while it is still sending; past that the
    answer goes out at once and the connection closes.
    """
    limit = app.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        n = int(declared)
        if n <= 4 * limit:
            async for _ in _chunks(request):
                pass
        return _json_response(413, {"error": app.body_too_large(n)}, close=True)
    parts: list[bytes] = []
    size = 0
    async for chunk in _chunks(request):  # also chunked bodies, which carry no length
        size += len(chunk)
        if size > limit:
            async for chunk2 in _chunks(request):
                size += len(chunk2)
                if size > 4 * limit:
                    break
            return _json_response(413, {"error": app.body_too_large(limit, True)}, close=True)
        parts.append(chunk)
    return b"".join(parts)


def make_asgi(app: RetrievalApp) -> Starlette:
    """The Starlette (ASGI) application serving ``app``; the batcher runs in its lifespan."""

    async def retrieve(request: Request) -> Response:
        try:
            body = await _read_body(request, app)
        except _Disconnected:
            return Response(status_code=400)  # nobody is listening any more
        if isinstance(body, Response):
            return body
        try:
            data, headers = await app.handle_retrieve(body)
        except RequestError as e:
            return _json_response(e.status, {"error": str(e)})
        except ServerStopping as e:
            return _json_response(503, {"error": str(e)}, close=True)
        except Exception as e:  # noqa: BLE001 - a failed search must not take the server down
            return _json_response(500, {"error": f"search failed: {type(e).__name__}: {e}"})
        return Response(data, media_type="application/json", headers=headers)

    async def health(request: Request) -> Response:
        return _json_response(200, app.health())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        p = request.url.path.rstrip("/") or "/"
        if exc.status_code == 405 and p == "/retrieve":
            msg = "use POST /retrieve with a JSON body"
        elif exc.status_code in (404, 405):
            msg = f"no route {request.method} {p}; use POST /retrieve or GET /health"
        else:
            msg = str(exc.detail)
        resp = _json_response(exc.status_code, {"error": msg})
        resp.headers.update(exc.headers or {})
        return resp

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        app.batcher.start()
        try:
            yield
        finally:
            await app.batcher.aclose()

    return Starlette(
        routes=[
            Route("/retrieve", retrieve, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )


# -- connection guards: uvicorn's HTTP protocols plus a read deadline --------------------------


def _raw_response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class _ReadDeadline:
    """Mixin for a uvicorn HTTP protocol: no connection waits on its client for ever.

    uvicorn times out only idle keep-alive connections. This adds: a request must arrive whole
    within ``read_timeout_s`` of its first byte (or of the connection opening), else a 408 and
    close; and a client whose unread response fills the socket buffer for that long is
    disconnected. The timer is off while a whole request is being answered.
    """

    read_timeout_s: float = 30.0
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any
    _sr1_timer: asyncio.TimerHandle | None = None
    _sr1_partial = False  # some of a request received, not all of it
    _sr1_write_paused = False

    def _sr1_arm(self) -> None:
        if self._sr1_timer is None:
            self._sr1_timer = self.loop.call_later(self.read_timeout_s, self._sr1_expired)

    def _sr1_disarm(self) -> None:
        if self._sr1_timer is not None:
            self._sr1_timer.cancel()
            self._sr1_timer = None

    def _sr1_request_whole(self) -> None:
        self._sr1_partial = False
        if not self._sr1_write_paused:
            self._sr1_disarm()

    def _sr1_answering(self) -> bool:
        """A whole request of this connection is being answered (pipelining: one queued)."""
        c = self.cycle
        return bool(getattr(self, "pipeline", None)) or (
            c is not None and not c.response_complete and not c.more_body
        )

    def _sr1_expired(self) -> None:
        self._sr1_timer = None
        if self.transport.is_closing():
            return
        if self._sr1_write_paused:
            self.transport.abort()  # the client stopped reading: drop the unsent response
            return
        if self._sr1_partial:
            if self._sr1_answering():
                self._sr1_arm()  # a pipelined request waits behind an answer: look again later
                return
            c = self.cycle
            if c is None or c.response_complete or not c.response_started:
                self.transport.write(
                    _raw_response(
                        "408 Request Timeout",
                        f"request not received whole within {self.read_timeout_s:g} s "
                        "(retrieval.server_read_timeout_s); send it at once",
                    )
                )
            self.transport.close()
        elif self.cycle is None:
            self.transport.close()  # connected and sent nothing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body go out in separate writes: with Nagle on, keep-alive clients
            # wait ~40 ms for a delayed ACK on every request (uvloop sets this, asyncio not).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sr1_arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._sr1_disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self._sr1_write_paused = True
        self._sr1_disarm()
        self._sr1_arm()

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._sr1_write_paused = False
        if not self._sr1_partial:
            self._sr1_disarm()


def _too_large_headers(proto: Any) -> None:
    if not proto.transport.is_closing():
        proto.transport.write(
            _raw_response(
                "431 Request Header Fields Too Large",
                f"request line and headers are over {MAX_HEADER_BYTES} bytes",
            )
        )
        proto.transport.close()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency; h11 is the fallback
    HttpToolsProtocol = None

if HttpToolsProtocol is not None:

    class _GuardedHttpTools(_ReadDeadline, HttpToolsProtocol):  # type: ignore[misc, valid-type]
        """httptools parser (uvicorn's default when installed) with the read deadline and a
        cap on header bytes (llhttp has none)."""

        _sr1_in_head = False
        _sr1_head_bytes = 0

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._sr1_partial = True
            self._sr1_in_head = True
            self._sr1_head_bytes = 0
            self._sr1_arm()

        def on_headers_complete(self) -> None:
            self._sr1_in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._sr1_request_whole()
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._sr1_in_head:
                self._sr1_head_bytes += len(data)
                if self._sr1_head_bytes > MAX_HEADER_BYTES:
                    _too_large_headers(self)


import h11  # noqa: E402 - uvicorn's own dependency
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402


class _GuardedH11(_ReadDeadline, H11Protocol):
    """h11 parser with the read deadline (h11 caps headers itself, at
    ``h11_max_incomplete_event_size``)."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        st = self.conn.their_state
        if st is h11.SEND_BODY or (st is h11.IDLE and self.conn.trailing_data[0]):
            self._sr1_partial = True
            self._sr1_arm()
        elif st is h11.DONE or st is h11.MUST_CLOSE:
            self._sr1_request_whole()


def guarded_protocol(read_timeout_s: float, parser: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``auto``: httptools if installed, else ``h11``) with the
    read deadline of :class:`_ReadDeadline` set to ``read_timeout_s``."""
    if parser not in ("auto", "httptools", "h11"):
        raise ValueError(f"parser must be auto, httptools or h11, not {parser!r}")
    base: type = _GuardedH11
    if parser != "h11" and HttpToolsProtocol is not None:
        base = _GuardedHttpTools
    elif parser == "httptools":
        raise Sr1Error("httptools is not installed (pip install httptools)")
    return type(base.__name__, (base,), {"read_timeout_s": float(read_timeout_s)})


# -- listening, running, stopping ---------------------------------------------------------------


class RetrievalServer:
    """uvicorn serving :func:`make_asgi` of ``app`` on a bound socket.

    :meth:`run` blocks (Ctrl-C / SIGTERM stop it gracefully); :meth:`start` and :meth:`stop`
    run it in a thread instead. ``server_port`` is the bound port (port 0 picks a free one).
    """

    def __init__(
        self,
        app: RetrievalApp,
        host: str = "127.0.0.1",
        port: int = 8000,
        verbose: bool = False,
        sock: socket.socket | None = None,
        parser: str = "auto",
    ) -> None:
        self.app = app
        self.host = host
        self.sock = sock if sock is not None else bind_socket(host, port)
        self.server_port: int = self.sock.getsockname()[1]
        cfg = app.cfg
        self.protocol = guarded_protocol(cfg.server_read_timeout_s, parser)
        self.config = uvicorn.Config(
            make_asgi(app),
            http=self.protocol,
            lifespan="on",
            timeout_keep_alive=cfg.server_keep_alive_s,  # type: ignore[arg-type]
            limit_concurrency=cfg.server_max_connections,
            backlog=cfg.server_backlog,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            log_config=uvicorn.config.LOGGING_CONFIG if verbose else None,
            log_level="info" if verbose else "warning",
            access_log=verbose,
            server_header=False,
        )
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.server_port}"

    @property
    def transport(self) -> str:
        parser = "httptools" if "HttpTools" in self.protocol.__name__ else "h11"
        return f"uvicorn ({parser}) + starlette"

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (main thread) or :meth:`stop`; then close the socket."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self, timeout: float = 30.0) -> None:
        """Serve in a daemon thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.run, name="sr1-retrieval-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise Sr1Error("the retrieval server failed to start (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise Sr1Error(f"the retrieval server did not start within {timeout:g} s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to SHUTDOWN_GRACE_S), stop."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=SHUTDOWN_GRACE_S + 10)
        self.sock.close()
        self.app.close()


def make_server(
    app: RetrievalApp,
    host: str = "127.0.0.1",
    port: int = 8000,
    verbose: bool = False,
    sock: socket.socket | None = None,
) -> RetrievalServer:
    """A server for ``app`` on ``host:port`` (or on ``sock``, bound by :func:`bind_socket`)."""
    return RetrievalServer(app, host, port, verbose, sock)


class BackgroundServer:
    """Run a server in a daemon thread (tests, benchmarks); ``url`` is its base address."""

    def __init__(
        self,
        retriever: Retriever,
        cfg: RetrievalConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        parser: str = "auto",
    ) -> None:
        self.app = make_app(retriever, cfg)
        self.server = RetrievalServer(self.app, host, port, parser=parser)
        self.url = self.server.url
        self.transport = self.server.transport

    def __enter__(self) -> BackgroundServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.stop()
