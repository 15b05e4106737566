"""The search environment: ``<search> query </search>`` runs the retriever (Search-R1's tool).

All of a turn's queries go to ``Retriever.search`` in one batched call. The observation body is
Search-R1's ``_passages2string``: ``Doc i(Title: T) text`` lines, where ``T`` is the corpus
line's first line exactly as stored (wiki-18 keeps the title's quotes:
``Doc 1(Title: "Parable of the Prodigal Son") …``) and ``text`` the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sr1.envs.base import Action, Env, Observation
from sr1.errors import Sr1Error
from sr1.retrieval.base import Retriever, format_passages


class SearchEnv(Env):
    """Search over a :class:`~sr1.retrieval.base.Retriever`, ``topk`` passages per query."""

    name = "search"
    tag = "search"

    def __init__(self, retriever: Retriever | None, topk: int = 3) -> None:
        self.retriever = retriever
        self.topk = topk

    def execute(self, actions: Sequence[Action]) -> list[Observation]:
        if self.retriever is None:
            raise Sr1Error("this SearchEnv has no retriever (it can parse and render only)")
        queries = [a.content for a in actions]
        results = self.retriever.search(queries, k=self.topk)
        if len(results) != len(queries):
            raise Sr1Error(f"retriever returned {len(results)} results for {len(queries)} queries")
        return [
            Observation(
                text=format_passages(ps),
                docs=[p.contents for p in ps],
                info={"query": q, "ids": [p.id for p in ps], "passages": list(ps)},
            )
            for q, ps in zip(queries, results, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        ret = self.retriever.describe() if self.retriever is not None else None
        return {"env": self.name, "topk": self.topk, "retriever": ret}
