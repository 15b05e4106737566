"""The retrieval server over real HTTP on 127.0.0.1: Search-R1's protocol, 4xx, batching, remote."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sr1.config import RetrievalConfig
from sr1.retrieval import open_retriever
from sr1.retrieval.remote import RemoteRetriever
from sr1.retrieval.server import BackgroundServer

CFG = RetrievalConfig(server_max_batch=64, server_max_topk=20, server_batch_wait_ms=20)


def _request(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def _post(url: str, obj) -> tuple[int, dict]:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return _request(url, "POST", "/retrieve", raw)


@pytest.fixture(scope="module")
def server(bm25_index: Path):
    retriever = open_retriever(str(bm25_index), CFG)
    with BackgroundServer(retriever, CFG) as s:
        yield s, retriever


def test_search_r1_request_and_response(server) -> None:
    s, local = server
    qs = ["who told the story of the prodigal son", "where is the tibia and fibula bone located"]
    status, body = _post(s.url, {"queries": qs, "topk": 3, "return_scores": True})
    assert status == 200 and len(body["result"]) == 2
    for q, row in zip(qs, body["result"], strict=True):
        assert len(row) == 3
        assert set(row[0]) == {"document", "score"} and set(row[0]["document"]) == {
            "id",
            "contents",
        }
        want = local.search([q], 3)[0]
        assert [x["document"]["id"] for x in row] == [p.id for p in want]
        assert [x["score"] for x in row] == pytest.approx([p.score for p in want], rel=1e-6)
    status, body = _post(s.url, {"queries": qs[:1], "topk": 2})  # Search-R1 default: no scores
    assert status == 200 and set(body["result"][0][0]) == {"id", "contents"}
    status, body = _post(s.url, {"queries": []})
    assert status == 200 and body == {"result": []}


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        (b"{not json", 400, "JSON"),
        ({"query": ["x"]}, 422, "queries"),
        ({"queries": "a single string"}, 422, "list of strings"),
        ({"queries": ["ok", 3]}, 422, "list of strings"),
        ({"queries": ["x"], "topk": 0}, 422, "topk"),
        ({"queries": ["x"], "topk": 21}, 422, "topk"),
        ({"queries": ["x"], "topk": "3"}, 422, "topk"),
        ({"queries": ["x"], "return_scores": "yes"}, 422, "return_scores"),
        ({"queries": ["q"] * 65}, 413, "limit is 64"),
        ([1, 2], 422, "object"),
    ],
)
def test_malformed_requests_get_4xx_and_server_stays_up(server, payload, status, needle) -> None:
    s, _ = server
    got, body = _post(s.url, payload)
    assert got == status and needle in body["error"]
    ok, body = _post(s.url, {"queries": ["wrestling"], "topk": 1})
    assert ok == 200 and len(body["result"][0]) == 1


def test_routes_health_and_cache(server) -> None:
    s, _ = server
    assert _request(s.url, "GET", "/retrieve")[0] == 405
    assert _request(s.url, "POST", "/search", b"{}")[0] == 404
    status, h = _request(s.url, "GET", "/health")
    assert status == 200 and h["status"] == "ok" and h["retriever"]["kind"] == "bm25"
    before = h["cache"]["hits"]
    for _ in range(2):
        _post(s.url, {"queries": ["cache me please"], "topk": 3})
    assert _request(s.url, "GET", "/health")[1]["cache"]["hits"] >= before + 1


def test_concurrent_requests_are_batched_and_correct(server, nq_dev: list[dict]) -> None:
    s, local = server
    qs = [q["question"] for q in nq_dev[100:164]]
    before = _request(s.url, "GET", "/health")[1]
    with ThreadPoolExecutor(16) as ex:
        got = list(
            ex.map(
                lambda i: _post(
                    s.url, {"queries": qs[i : i + 4], "topk": 3, "return_scores": True}
                ),
                range(0, 64, 4),
            )
        )
    want = local.search(qs, 3)
    flat = [row for status, body in got for row in body["result"]]
    assert all(status == 200 for status, _ in got)
    assert [[x["document"]["id"] for x in row] for row in flat] == [[p.id for p in w] for w in want]
    after = _request(s.url, "GET", "/health")[1]
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16  # concurrent requests shared searches


def test_remote_retriever_matches_local(server) -> None:
    s, local = server
    remote = open_retriever(s.url + "/retrieve", CFG)
    assert isinstance(remote, RemoteRetriever)
    qs = [f"query number {i} about football" for i in range(100)]  # > max_batch: split in two
    got, want = remote.search(qs, 3), local.search(qs, 3)
    assert [[p.id for p in x] for x in got] == [[p.id for p in x] for x in want]
    assert got[0][0].contents == want[0][0].contents
    assert remote.describe()["manifest_sha256"] == local.describe()["manifest_sha256"]


def test_remote_retriever_unreachable_is_a_user_error() -> None:
    from sr1.errors import Sr1Error

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Sr1Error, match="cannot reach retrieval server"):
        RemoteRetriever(f"http://127.0.0.1:{port}", RetrievalConfig(remote_timeout_s=2)).search(
            ["x"], 1
        )


def test_cli_serve_retriever_subprocess(bm25_index: Path) -> None:
    """`sr1 serve retriever` as users run it: a real process, polled until healthy, then stopped."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, SR1_HOME=str(bm25_index.parent.parent))
    cmd = [
        sys.executable,
        "-m",
        "sr1.cli.main",
        "serve",
        "retriever",
        "--index",
        bm25_index.name,
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _request(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "server did not come up in 60 s"
            time.sleep(0.2)
        status, body = _post(
            url, {"queries": ["prodigal son parable"], "topk": 3, "return_scores": True}
        )
        assert status == 200 and "Prodigal" in body["result"][0][0]["document"]["contents"]
        assert _post(url, {"topk": 3})[0] == 422
    finally:
        proc.terminate()
        proc.wait(timeout=10)
