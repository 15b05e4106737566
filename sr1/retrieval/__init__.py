"""Corpora, indices (BM25, dense) and the one batched Retriever interface used everywhere.

``open_retriever(index)`` is the entry point for rollout, eval and the server: ``index`` is a
built index name (``sr1 index list``) or the http(s) URL of a Search-R1 ``/retrieve`` server.
"""

from __future__ import annotations

from sr1.config import RetrievalConfig
from sr1.retrieval.base import Passage, Retriever, format_passages

__all__ = ["Passage", "Retriever", "format_passages", "open_retriever"]


def open_retriever(index: str, cfg: RetrievalConfig | None = None) -> Retriever:
    """A retriever for an index name, an index folder, or an http(s) ``/retrieve`` URL.

    Unknown names raise NotFoundError listing the built indices and how to build one.
    """
    if index.startswith(("http://", "https://")):
        from sr1.retrieval.remote import RemoteRetriever

        return RemoteRetriever(index, cfg)
    from sr1.retrieval.index import open_index

    return open_index(index, cfg)
