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

CFG = RetrievalConfig(
    topk=5,  # a server default unlike the 3 that clients send, so defaulting is visible
    server_max_batch=64,
    server_max_topk=20,
    server_batch_wait_ms=20,
    server_max_queries=1000,
    server_max_body_mb=1,
)


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
        ({"queries": None}, 422, "list of strings, not null"),
        ({"queries": ["x"], "topk": 3.5}, 422, "'topk' must be an integer"),
        ({"queries": ["x"], "topk": "abc"}, 422, "'topk' must be an integer"),
        ({"queries": ["x"], "topk": "1e3"}, 422, "'topk' must be an integer"),
        ({"queries": ["x"], "topk": [3]}, 422, "'topk' must be an integer"),
        (b'{"queries": ["x"], "topk": Infinity}', 422, "'topk' must be an integer"),
        ({"queries": ["x"], "topk": -1}, 422, "must not be negative"),
        ({"queries": ["x"], "topk": "-2"}, 422, "server default of 5"),
        ({"queries": ["x"], "return_scores": "maybe"}, 422, "return_scores"),
        ({"queries": ["x"], "return_scores": None}, 422, "return_scores"),
        ({"queries": ["q"] * 1001}, 413, "at most 1000 (retrieval.server_max_queries)"),
        ({"queries": ["q" * (1 << 20)]}, 413, "retrieval.server_max_body_mb=1"),
        ([1, 2], 422, "object"),
    ],
)
def test_malformed_requests_get_4xx_and_server_stays_up(server, payload, status, needle) -> None:
    s, _ = server
    got, body = _post(s.url, payload)
    assert got == status and needle in body["error"], body
    ok, body = _post(s.url, {"queries": ["wrestling"], "topk": 1})
    assert ok == 200 and len(body["result"][0]) == 1


def _ids(rows: list) -> list[list[str]]:
    return [[x["document"]["id"] for x in row] for row in rows]


@pytest.mark.parametrize(
    ("extra", "want_k"),
    [
        ({}, 5),  # missing: the server default (CFG.topk), as Search-R1's `if not request.topk`
        ({"topk": None}, 5),
        ({"topk": 0}, 5),
        ({"topk": "0"}, 5),
        ({"topk": False}, 5),  # pydantic reads false as 0
        ({"topk": 3}, 3),
        ({"topk": "3"}, 3),  # pydantic lax mode: numeric strings ...
        ({"topk": " 3 "}, 3),
        ({"topk": "3.0"}, 3),
        ({"topk": 3.0}, 3),  # ... and integral floats
        ({"topk": True}, 1),
        ({"topk": 21}, 20),  # over server_max_topk: clamped to it
        ({"topk": 10**30}, 20),
    ],
)
def test_topk_defaults_coercion_and_clamp(server, extra, want_k) -> None:
    s, local = server
    q = "who wrote the declaration of independence"
    status, body = _post(s.url, {"queries": [q], "return_scores": True, **extra})
    assert status == 200, body
    assert _ids(body["result"]) == [[p.id for p in local.search([q], want_k)[0]]]
    assert len(body["result"][0]) == want_k


def test_topk_clamped_to_corpus_size(server) -> None:
    """A topk beyond the corpus is clamped to the corpus size before the retriever sees it."""
    _, local = server

    class Tiny:  # the real retriever, described as a 7-passage corpus
        def search(self, queries, k=3):
            assert k <= 7, f"asked for {k} of 7 passages"
            return local.search(queries, k)

        def describe(self):
            return dict(local.describe(), passages=7)

    with BackgroundServer(Tiny(), CFG) as s:
        status, body = _post(s.url, {"queries": ["football"], "topk": 15})
        assert status == 200 and len(body["result"][0]) == 7
        assert _request(s.url, "GET", "/health")[1]["limits"]["max_topk"] == 7


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("yes", True),
        ("False", False),
        ("off", False),
        ("T", True),
    ],
)
def test_return_scores_is_pydantic_lax_bool(server, value, want) -> None:
    s, _ = server
    status, body = _post(s.url, {"queries": ["football"], "topk": 1, "return_scores": value})
    assert status == 200, body
    assert ("score" in body["result"][0][0]) is want


LAX_CASES = [
    3, 0, -1, 10**30, True, False, 3.0, -0.0, 3.5, 1e20, 2.0**63, 9.2e18, float("inf"),
    float("nan"), "3", " 3 ", "\t3\n", "+3", "-3", "03", "3.0", "3.00", "+3.0", "1_000",
    "1_000.0", "3.", ".0", "3.10", "3.0_0", "_1", "1__0", "1_", "1e3", "0x10", "abc", "",
    "   ", "+-3", "+ 3", "1 000", "٣", "9" * 30, [3], {"a": 1}, 1, 2, 0.0, 1.0, 1.5, "true",
    "TRUE", "tRuE", "yes", "no", "on", "off", "t", "f", "y", "n", "1", "0", " true", "2",
    "1.0", [], "maybe",
]  # fmt: skip


def test_parsing_matches_pydantic_lax_mode() -> None:
    """topk and return_scores read exactly as Search-R1's pydantic (v2) model reads them."""
    pydantic = pytest.importorskip("pydantic")
    from sr1.retrieval.server import lax_bool, lax_int

    as_int = pydantic.TypeAdapter(int | None)
    as_bool = pydantic.TypeAdapter(bool)
    for v in LAX_CASES:
        for ours, ta in ((lax_int, as_int), (lax_bool, as_bool)):
            try:
                theirs = ta.validate_python(v)
            except pydantic.ValidationError:
                theirs = None
            assert ours(v) == theirs, (ours.__name__, v, theirs)
            assert type(ours(v)) is type(theirs), (ours.__name__, v)


def _grpo_queries(questions: list[str], n: int) -> list[str]:
    """``n`` distinct search queries of 40-200 characters made from real NQ questions."""
    out: dict[str, None] = {}
    i = 0
    while len(out) < n:
        a, b = (
            questions[i % len(questions)],
            questions[(i * 7 + i // len(questions) + 1) % len(questions)],
        )
        out[(a + " " + b + " " + a)[: 40 + (i * 37) % 161].strip()] = None
        i += 1
    return list(out)


def test_grpo_turn_answered_in_one_request_by_default(server, nq_dev: list[dict]) -> None:
    """512 prompts x 5 samples = 2,560 queries: one request under the default limits, chunked
    inside the server (no search call over server_max_batch), each row as the in-process one."""
    _, local = server
    cfg = RetrievalConfig()  # the defaults `sr1 serve retriever` runs with
    qs = _grpo_queries([q["question"] for q in nq_dev], 512 * 5)
    assert len(qs) == 2560 and max(map(len, qs)) <= 200
    with BackgroundServer(local, cfg) as s:
        t0 = time.perf_counter()
        status, body = _post(s.url, {"queries": qs, "topk": 3, "return_scores": True})
        elapsed = time.perf_counter() - t0
        health = _request(s.url, "GET", "/health")[1]
    print(f"2,560-query request answered in {elapsed:.2f} s")
    assert status == 200, body
    assert len(body["result"]) == 2560
    want = local.search(qs, 3)
    assert _ids(body["result"]) == [[p.id for p in w] for w in want]
    assert [[x["score"] for x in row] for row in body["result"]] == [
        pytest.approx([p.score for p in w], rel=1e-6) for w in want
    ]
    assert [row[0]["document"]["contents"] for row in body["result"]] == [
        w[0].contents for w in want
    ]
    assert health["largest_batch"] <= cfg.server_max_batch < 2560
    assert health["batches"] >= 2560 // cfg.server_max_batch


def test_search_r1_client_code_works(server) -> None:
    """Search-R1's own client, inline: this mirrors `LLMGenerationManager._batch_search` and
    `_passages2string` in search_r1/llm_agent/generation.py (requests.post(...).json())."""
    requests = pytest.importorskip("requests")
    s, local = server
    search_url = s.url + "/retrieve"
    queries = ["who told the story of the prodigal son", "when did the eagles win the super bowl"]

    def _batch_search(queries):
        payload = {"queries": queries, "topk": 3, "return_scores": True}
        return requests.post(search_url, json=payload).json()

    def _passages2string(retrieval_result):
        format_reference = ""
        for idx, doc_item in enumerate(retrieval_result):
            content = doc_item["document"]["contents"]
            title = content.split("\n")[0]
            text = "\n".join(content.split("\n")[1:])
            format_reference += f"Doc {idx + 1}(Title: {title}) {text}\n"
        return format_reference

    results = _batch_search(queries)["result"]
    assert len(results) == 2
    for q, result in zip(queries, results, strict=True):
        assert all(isinstance(item["score"], float) for item in result)
        want = local.search([q], 3)[0]
        assert [item["document"]["contents"] for item in result] == [p.contents for p in want]
        text = _passages2string(result)
        assert text == _passages2string([{"document": p.to_dict()} for p in want])
        assert text.startswith(f"Doc 1(Title: {want[0].contents.partition(chr(10))[0]}) ")


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
    remote = open_retriever(s.url + "/retrieve", RetrievalConfig(server_max_queries=64))
    assert isinstance(remote, RemoteRetriever)
    qs = [f"query number {i} about football" for i in range(100)]  # > 64: two requests
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
