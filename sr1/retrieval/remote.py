"""A Retriever that calls any HTTP server speaking Search-R1's ``/retrieve`` protocol.

Request ``{"queries": [...], "topk": k, "return_scores": true}``; response
``{"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}`` (or, without
scores, bare documents). Works with ``sr1 serve retriever`` and Search-R1's own
``retrieval_server.py``, so existing retrieval servers can be reused as they are.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from sr1.config import RetrievalConfig
from sr1.errors import Sr1Error
from sr1.retrieval.base import Passage
from sr1.retrieval.corpus import make_contents


def _passage(item: Any) -> Passage:
    doc, score = (
        (item.get("document"), item.get("score", 0.0)) if "document" in item else (item, 0.0)
    )
    if not isinstance(doc, dict):
        raise ValueError(f"document is not an object: {doc!r}")
    if "contents" in doc:
        contents = doc["contents"]
    else:
        contents = make_contents(str(doc.get("title", "")), str(doc.get("text", "")))
    return Passage(id=str(doc.get("id", "")), contents=str(contents), score=float(score or 0.0))


class RemoteRetriever:
    """Batched search against ``<url>/retrieve``; batches over ``server_max_queries`` are split."""

    kind = "remote"

    def __init__(self, url: str, cfg: RetrievalConfig | None = None) -> None:
        cfg = cfg or RetrievalConfig()
        base = url.rstrip("/")
        self.url = base if base.endswith("/retrieve") else base + "/retrieve"
        self.base = self.url[: -len("/retrieve")]
        self.timeout = cfg.remote_timeout_s
        # One request per batch up to the server's request limit (it chunks internally).
        self.max_batch = max(1, cfg.server_max_queries)

    def _post(self, queries: list[str], k: int) -> list[list[Passage]]:
        body = json.dumps({"queries": queries, "topk": k, "return_scores": True}).encode()
        req = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise Sr1Error(f"retrieval server {self.url} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise Sr1Error(
                f"cannot reach retrieval server {self.url}: {getattr(e, 'reason', e)}",
                hint="start one with `sr1 serve retriever --index NAME` or check the URL",
            ) from None
        try:
            result = data["result"]
            if len(result) != len(queries):
                raise ValueError(f"{len(result)} result lists for {len(queries)} queries")
            return [[_passage(it) for it in row] for row in result]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise Sr1Error(
                f"retrieval server {self.url} sent a response not in Search-R1's format ({e})"
            ) from None

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        qs = list(queries)
        out: list[list[Passage]] = []
        for i in range(0, len(qs), self.max_batch):
            out += self._post(qs[i : i + self.max_batch], k)
        return out

    def health(self) -> dict[str, Any] | None:
        """The server's ``/health`` document, or None when it has none."""
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=self.timeout) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ValueError, TimeoutError, ConnectionError):
            return None

    def describe(self) -> dict[str, Any]:
        h = self.health() or {}
        inner = h.get("retriever") if isinstance(h, dict) else None
        return {
            "kind": self.kind,
            "name": self.url,
            "manifest_sha256": (inner or {}).get("manifest_sha256"),
            "params": {"url": self.url, "server": inner},
        }
