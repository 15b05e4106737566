"""Corpora, indices (BM25, dense) and the one batched Retriever interface used everywhere."""
