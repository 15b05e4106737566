"""The Retriever interface and how passages are shown to the model.

Every consumer (rollout, eval, server) calls ``Retriever.search(queries, k)`` with a batch
of queries and gets, per query, the top-k :class:`Passage` objects best first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Passage:
    """A corpus passage in wiki-18 form: ``contents`` is ``"Title"\\ntext``."""

    id: str
    contents: str
    score: float = 0.0

    @property
    def title(self) -> str:
        """The title for display, its wiki-18 quotes removed (the model sees them: see
        :func:`format_passages`)."""
        first = self.contents.split("\n", 1)[0]
        return first.strip().strip('"')

    @property
    def text(self) -> str:
        parts = self.contents.split("\n", 1)
        return parts[1] if len(parts) > 1 else parts[0]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "contents": self.contents}


@runtime_checkable
class Retriever(Protocol):
    """A batched search engine. Implementations: BM25, dense (faiss), remote HTTP."""

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        """Top-k passages for each query, best first; ``len(result) == len(queries)``."""
        ...

    def describe(self) -> dict[str, Any]:
        """What identifies this retriever for reproducibility (kind, index name, manifest hash)."""
        ...


def format_passages(passages: Sequence[Passage]) -> str:
    """Search-R1's observation body (``_passages2string`` then ``.strip()``): one
    ``Doc i(Title: T) text`` line per passage, i from 1, where ``T`` is the first line of
    ``contents`` exactly as stored (wiki-18 quotes it) and ``text`` the lines after it.
    An empty result is ``""``."""
    lines = []
    for i, p in enumerate(passages, 1):
        title, _, text = p.contents.partition("\n")
        lines.append(f"Doc {i}(Title: {title}) {text}\n")
    return "".join(lines).strip()
