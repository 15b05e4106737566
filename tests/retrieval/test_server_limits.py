"""The retrieval server's limits over real HTTP on 127.0.0.1: a byte-bounded cache, read timeouts,
fair scheduling of big and small requests, oversized numbers and deep JSON, a port in use.

A fake retriever stands in for the index (its cost per query is a sleep), so every test here is
a few requests and at most a few seconds; tests/retrieval/test_server.py covers the real index.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sr1.config import RetrievalConfig
from sr1.errors import Sr1Error
from sr1.retrieval.base import Passage
from sr1.retrieval.server import BackgroundServer, LRUCache, bind_socket, entry_bytes

REPO = Path(__file__).resolve().parents[2]


class FakeRetriever:
    """Deterministic passages for any query; records each search call's queries.

    ``per_query_s``/``per_char_s`` make a call take that long (a sleep, which frees the GIL, as
    bm25s' numba kernels and faiss do), like a big index would.
    """

    def __init__(self, per_query_s: float = 0.0, per_char_s: float = 0.0, size: int = 40) -> None:
        self.per_query_s = per_query_s
        self.per_char_s = per_char_s
        self.size = size
        self.calls: list[list[str]] = []

    def search(self, queries, k=3):
        qs = list(queries)
        self.calls.append(qs)
        time.sleep(self.per_query_s * len(qs) + self.per_char_s * sum(map(len, qs)))
        return [
            [
                Passage(f"{len(q)}-{j}", f'"T{j}"\n{q[:20]} ' + "x" * self.size, 1.0 / (j + 1))
                for j in range(k)
            ]
            for q in qs
        ]

    def describe(self):
        return {"kind": "fake", "passages": 1000}


def _cfg(**kw) -> RetrievalConfig:
    return RetrievalConfig(**{"server_read_timeout_s": 5.0, **kw})


def _conn(url: str, timeout: float = 30) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def _post(url: str, obj, timeout: float = 30) -> tuple[int, dict, dict]:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    c = _conn(url, timeout)
    try:
        c.request("POST", "/retrieve", body=raw, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}"), dict(r.getheaders())
    finally:
        c.close()


def _health(url: str) -> dict:
    c = _conn(url, 10)
    try:
        c.request("GET", "/health")
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_responses_are_fastapis_compact_json_with_or_without_orjson() -> None:
    from sr1.retrieval.server import RetrievalApp, _dumps_json, dumps

    rows = [[Passage("7", '"Émile Zola"\nnaturalisme — 1880 ✓', 12.34567928314209)], []]
    for scores in (True, False):
        data = RetrievalApp.render(rows, scores)
        assert data == _dumps_json(json.loads(data)) == dumps(json.loads(data))
    assert RetrievalApp.render(rows, True).startswith(
        b'{"result":[[{"document":{"id":"7","contents":"\\"\xc3\x89mile'
    )


# -- the cache is bounded in bytes -------------------------------------------------------------


def test_lru_cache_is_bounded_in_bytes() -> None:
    cache = LRUCache(1 << 20)
    big = [Passage(str(j), "y" * 50_000, 1.0) for j in range(3)]  # ~150 KB an entry
    for i in range(40):
        cache.put((f"query {i}", 3), big)
        assert cache.bytes <= 1 << 20
    st = cache.stats()
    assert 4 <= st["entries"] <= 7 and st["evictions"] == 40 - st["entries"]
    assert cache.get(("query 39", 3)) is big and cache.get(("query 0", 3)) is None
    assert entry_bytes("q" * 10_000, big) > 150_000 + 10_000
    cache.put(("huge", 3), [Passage("h", "z" * (2 << 20))])  # over the whole budget: not kept
    assert cache.get(("huge", 3)) is None and cache.bytes <= 1 << 20
    off = LRUCache(0)
    off.put(("a", 3), big)
    assert off.get(("a", 3)) is None and off.stats()["entries"] == 0


def test_server_cache_stays_under_its_budget_with_huge_queries_and_passages() -> None:
    """300 distinct 1 MiB queries used to be kept whole (RSS +1.2 GB); now each is cut to
    server_max_query_chars and the cache holds at most server_cache_mb of entries."""
    fake = FakeRetriever(size=20_000)  # 3 passages of 20 KB per query
    cfg = _cfg(server_cache_mb=1, server_max_query_chars=2000)
    with BackgroundServer(fake, cfg) as s:
        for i in range(40):
            q = f"{i:03d} " + "football " * (120_000 if i < 4 else 100)  # the first four ~1 MiB
            status, body, headers = _post(s.url, {"queries": [q], "topk": 3})
            assert status == 200 and len(body["result"][0]) == 3
            if i < 4:
                assert headers.get("x-sr1-truncated-queries") == "1"
                assert len(fake.calls[-1][0]) == 2000  # searched cut, so cached cut
        h = _health(s.url)
    assert h["truncated_queries"] == 4 and h["limits"]["max_query_chars"] == 2000
    cache = h["cache"]
    assert cache["capacity_bytes"] == 1 << 20 and 0 < cache["bytes"] <= 1 << 20
    assert cache["entries"] < 40 and cache["evictions"] > 0


# -- read timeouts -----------------------------------------------------------------------------


def _read_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_half_sent_requests_are_closed_within_the_read_timeout(parser: str) -> None:
    pytest.importorskip(parser)
    cfg = _cfg(server_read_timeout_s=1.0)
    with BackgroundServer(FakeRetriever(), cfg, parser=parser) as s:
        port = _port(s.url)
        silent = socket.create_connection(("127.0.0.1", port))
        half_head = socket.create_connection(("127.0.0.1", port))
        half_body = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        half_head.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Le")
        half_body.sendall(
            b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 40\r\n\r\n{"queries": ["foot'
        )
        # Meanwhile a normal request is answered at once.
        status, body, _ = _post(s.url, {"queries": ["football"], "topk": 2}, timeout=5)
        assert status == 200 and len(body["result"][0]) == 2
        assert time.monotonic() - t0 < 0.9  # before any of the three is timed out
        got = {}
        for name, sock in (("silent", silent), ("head", half_head), ("body", half_body)):
            with sock:
                got[name] = (_read_until_closed(sock, 5.0), time.monotonic() - t0)
        for name, (_, when) in got.items():
            assert 0.9 <= when < 3.0, (name, when)
        assert got["silent"][0] == b""  # nothing was asked, nothing is answered
        for name in ("head", "body"):
            assert got[name][0].startswith(b"HTTP/1.1 408"), got[name][0][:80]
            assert b"retrieval.server_read_timeout_s" in got[name][0]
        assert _post(s.url, {"queries": ["still up"]}, timeout=5)[0] == 200


def test_keep_alive_connection_serves_several_requests_then_times_out() -> None:
    cfg = _cfg(server_read_timeout_s=1.0, server_keep_alive_s=0.5)
    with BackgroundServer(FakeRetriever(), cfg) as s:
        c = _conn(s.url, 5)
        for i in range(3):
            c.request("POST", "/retrieve", body=json.dumps({"queries": [f"q{i}"]}))
            assert c.getresponse().read() and c.sock is not None
        sock = c.sock
        t0 = time.monotonic()
        assert _read_until_closed(sock, 5.0) == b""
        assert 0.3 < time.monotonic() - t0 < 2.0
        c.close()


def test_a_client_that_never_reads_its_response_is_disconnected() -> None:
    cfg = _cfg(server_read_timeout_s=1.0, server_max_topk=20)
    with BackgroundServer(FakeRetriever(size=4000), cfg) as s:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", _port(s.url)))
        body = json.dumps({"queries": [f"q{i}" for i in range(100)], "topk": 20}).encode()
        sock.sendall(
            b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        time.sleep(2.5)  # 8 MB of response wait on a reader that does not read
        data = _read_until_closed(sock, 5.0)
        sock.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert length > 8_000_000 and len(rest) < length  # cut off, not delivered
        assert _post(s.url, {"queries": ["still up"]}, timeout=5)[0] == 200


def test_oversize_headers_get_431_and_connection_limit_gives_503() -> None:
    cfg = _cfg(server_read_timeout_s=3.0, server_max_connections=3)
    with BackgroundServer(FakeRetriever(), cfg) as s:
        port = _port(s.url)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (100 << 10))
            data = _read_until_closed(sock, 5.0)
        assert data.startswith(b"HTTP/1.1 431"), data[:60]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.1)
        try:
            status = _post(s.url, {"queries": ["x"]}, timeout=5)[0]
        except (http.client.HTTPException, ValueError):
            status = 503  # uvicorn's 503 is plain text
        assert status == 503
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        assert _post(s.url, {"queries": ["x"]}, timeout=5)[0] == 200


def test_chunked_bodies_are_read_up_to_the_body_limit() -> None:
    with BackgroundServer(FakeRetriever(), _cfg(server_max_body_mb=1)) as s:
        c = _conn(s.url, 10)
        ok = json.dumps({"queries": ["a", "b"], "topk": 1}).encode()
        c.request("POST", "/retrieve", body=iter([ok[:10], ok[10:]]), encode_chunked=True)
        r = c.getresponse()
        assert r.status == 200 and len(json.loads(r.read())["result"]) == 2
        c.close()
        c = _conn(s.url, 10)
        big = json.dumps({"queries": ["q" * (3 << 19)]}).encode()  # 1.5 MiB
        chunks = [big[i : i + 65536] for i in range(0, len(big), 65536)]
        c.request("POST", "/retrieve", body=iter(chunks), encode_chunked=True)
        r = c.getresponse()
        assert r.status == 413 and "server_max_body_mb=1" in json.loads(r.read())["error"]
        c.close()


# -- fair scheduling -------------------------------------------------------------------------


def _timed_post(url: str, obj, out: dict, key: str) -> None:
    t = time.perf_counter()
    out[key] = _post(url, obj, timeout=60)
    out[key + "_done"] = time.perf_counter()
    out[key + "_s"] = out[key + "_done"] - t


def _wait_searching(url: str, fake: FakeRetriever) -> None:
    deadline = time.monotonic() + 10
    while not fake.calls:
        assert time.monotonic() < deadline, "the big request never reached the retriever"
        time.sleep(0.005)


def test_small_request_is_not_stuck_behind_a_big_one() -> None:
    """A 2,560-query request (40 searches of 64 at 1 ms a query: ~2.6 s) and a 1-query request
    sent while it runs: the small one rides the next search and is back long before."""
    fake = FakeRetriever(per_query_s=0.001)
    cfg = _cfg(server_max_batch=64, server_cache_mb=0)
    with BackgroundServer(fake, cfg) as s:
        out: dict = {}
        big = threading.Thread(
            target=_timed_post,
            args=(s.url, {"queries": [f"big {i}" for i in range(2560)], "topk": 3}, out, "big"),
        )
        big.start()
        _wait_searching(s.url, fake)
        _timed_post(s.url, {"queries": ["small one"], "topk": 3}, out, "small")
        big.join(60)
    assert out["big"][0] == 200 and len(out["big"][1]["result"]) == 2560
    assert out["small"][0] == 200 and len(out["small"][1]["result"]) == 1
    assert out["small_done"] < out["big_done"]
    assert out["small_s"] < out["big_s"] / 3, out  # ~0.1 s against ~2.6 s when idle
    assert max(map(len, fake.calls)) <= 64
    shared = next(c for c in fake.calls if "small one" in c)
    assert len(shared) == 64  # one search: the small query and 63 of the big request's


def test_long_queries_make_smaller_searches_not_slower_ones() -> None:
    """256 queries of 4,096 characters (cost per character) next to a short one: a search
    carries at most server_max_batch x 256 characters, so the short query waits one small
    search, not a 1 MiB one."""
    fake = FakeRetriever(per_char_s=1e-6)  # ~1 s for the whole big request
    cfg = _cfg(server_max_batch=64, server_cache_mb=0)
    with BackgroundServer(fake, cfg) as s:
        out: dict = {}
        long_qs = [f"{i:04d}" + "w" * 4092 for i in range(256)]
        big = threading.Thread(target=_timed_post, args=(s.url, {"queries": long_qs}, out, "big"))
        big.start()
        _wait_searching(s.url, fake)
        _timed_post(s.url, {"queries": ["short"]}, out, "small")
        big.join(60)
        limits = _health(s.url)["limits"]
    assert out["big"][0] == 200 and out["small"][0] == 200
    assert limits["max_batch_chars"] == 64 * 256
    assert all(sum(map(len, c)) <= 64 * 256 for c in fake.calls)
    assert out["small_done"] < out["big_done"] and out["small_s"] < out["big_s"] / 3, out


def test_a_failing_search_fails_only_the_requests_in_it() -> None:
    class Flaky(FakeRetriever):
        def search(self, queries, k=3):
            if any(q == "boom" for q in queries):
                raise ValueError("index file vanished")
            return super().search(queries, k)

    with BackgroundServer(Flaky(), _cfg()) as s:
        status, body, _ = _post(s.url, {"queries": ["fine", "boom"]})
        assert status == 500 and "search failed: ValueError: index file vanished" in body["error"]
        assert _post(s.url, {"queries": ["fine"]})[0] == 200


# -- oversized numbers, deep nesting -----------------------------------------------------------

DEEP = 100_000


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b'{"queries": ["x"], "topk": 1e400}', 422, "'topk' must be an integer"),
        (b'{"queries": ["x"], "topk": -1e400}', 422, "'topk' must be an integer"),
        (b'{"queries": ["x"], "topk": -' + b"9" * 5000 + b"}", 422, "must not be negative"),
        (b'{"queries": [99999999999999999999999]}', 422, "item 0 is a number"),
        (b'{"queries": [1e400]}', 422, "item 0 is a number"),
        (b'{"queries": ["' + b"1" * 5000 + b'", ' + b"1" * 5000 + b"]}", 422, "item 1"),
        (b'{"queries": ["x"], "return_scores": 1e400}', 422, "return_scores"),
        (b"[" * DEEP + b"]" * DEEP, 400, "nested too deeply"),
        (b'{"queries": ["x"], "extra": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400, "nested"),
        (b'{"a": ' * DEEP + b"1" + b"}" * DEEP, 400, "nested too deeply"),
    ],
)
def test_oversized_numbers_and_deep_nesting_get_4xx(raw: bytes, status: int, needle: str) -> None:
    with BackgroundServer(FakeRetriever(), _cfg(server_max_topk=20)) as s:
        got, body, _ = _post(s.url, raw)
        assert got == status and needle in body["error"], body
        assert _post(s.url, {"queries": ["ok"], "topk": 1})[0] == 200


@pytest.mark.parametrize("digits", [23, 5000])
def test_huge_topk_is_clamped_like_any_large_topk(digits: int) -> None:
    """An integer topk of any length is clamped to server_max_topk, as 10**30 is in
    test_server.py (a 5,000-digit one used to be int()'s digit-limit ValueError: a 500)."""
    with BackgroundServer(FakeRetriever(), _cfg(server_max_topk=20)) as s:
        raw = b'{"queries": ["x"], "topk": ' + b"9" * digits + b"}"
        got, body, _ = _post(s.url, raw)
        assert got == 200 and len(body["result"][0]) == 20, body


# -- ports, start and stop --------------------------------------------------------------------


def test_port_in_use_is_a_one_line_error_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(Sr1Error, match=f"^port {port} on 127.0.0.1 is in use$"):
            bind_socket("127.0.0.1", port)
        # The CLI binds before loading anything: the index need not even exist.
        proc = subprocess.run(
            [sys.executable, "-m", "sr1.cli.main", "serve", "retriever", "--index", "nope"]
            + ["--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=dict(os.environ, COLUMNS="200"),
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: port {port} on 127.0.0.1 is in use"]


def test_background_server_stops_cleanly_with_connections_open() -> None:
    s = BackgroundServer(FakeRetriever(), _cfg(server_read_timeout_s=1.0))
    s.__enter__()
    port = _port(s.url)
    assert _post(s.url, {"queries": ["x"]})[0] == 200
    idle = socket.create_connection(("127.0.0.1", port))
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
    time.sleep(0.05)
    t0 = time.monotonic()
    s.stop()
    assert time.monotonic() - t0 < 4.0
    assert not s.server._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    idle.close()
    half.close()
