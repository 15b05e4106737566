"""BM25 over a corpus with bm25s: a streaming index builder and the memory-mapped retriever.

Tokenisation is bm25s' (lowercase, ``\\w\\w+`` words, English stopwords, PyStemmer English
stems). The builder departs from ``bm25s.BM25.index`` on purpose: bm25s wants every
document's token list in Python lists at once (about 36 bytes a token), which does not
fit wiki-18; here each chunk of passages is reduced to numpy ``(doc, term, tf)`` postings
(10 bytes each) as it streams by, and the Lucene BM25 matrix is assembled from those at
the end. The result is saved in bm25s' own format and loaded with ``mmap=True``; queries
are scored by bm25s (numba backend when available). ``tests/retrieval`` checks that the
scores equal bm25s' own index on the sample corpus.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sr1.config import RetrievalConfig
from sr1.errors import Sr1Error
from sr1.retrieval.base import Passage
from sr1.retrieval.docstore import DocStore

BM25_DIR = "bm25"
_SPLIT = re.compile(r"(?u)\b\w\w+\b")


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(requested: str, num_docs: int = 0, numba_min_docs: int = 100_000) -> str:
    """numba when asked for (or ``auto`` on a big index) and importable, else numpy.

    numba scores a query about 50x faster but compiles for ~6 s in every new process, which
    a one-off ``sr1 search`` on a small index never earns back.
    """
    if requested not in ("auto", "numba", "numpy"):
        raise Sr1Error(f"unknown bm25 backend {requested!r}; valid: auto, numba, numpy")
    want = requested == "numba" or (requested == "auto" and num_docs >= numba_min_docs)
    return "numba" if want and numba_available() else "numpy"


def _stemmer() -> Any:
    import Stemmer

    return Stemmer.Stemmer("english")


class BM25Builder:
    """Streams passages into BM25 postings; ``finish()`` writes the bm25s index."""

    def __init__(self, out_dir: Path, cfg: RetrievalConfig) -> None:
        from bm25s.tokenization import Tokenizer

        self.out_dir = out_dir
        self.cfg = cfg
        self.tokenizer = Tokenizer(stopwords="en", stemmer=_stemmer())
        self._docs: list[np.ndarray] = []  # each (P_chunk,) int32 row numbers
        self._terms: list[np.ndarray] = []  # each (P_chunk,) int32 term ids
        self._tfs: list[np.ndarray] = []  # each (P_chunk,) uint16 term frequencies
        self._lens: list[np.ndarray] = []  # each (B_chunk,) int32 document lengths in tokens

    def add(self, start: int, batch: Sequence[Passage]) -> None:
        ids = list(
            self.tokenizer.streaming_tokenize([p.contents for p in batch], update_vocab=True)
        )
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))  # (B,)
        flat = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum())
        )
        local = np.repeat(np.arange(len(ids), dtype=np.int64), lens)  # (T,) doc of each token
        # One posting per distinct (doc, term): sort-unique on a packed 64-bit key.
        keys, tf = np.unique((local << 32) | flat, return_counts=True)  # (P,), (P,)
        self._docs.append((keys >> 32).astype(np.int32) + np.int32(start))
        self._terms.append((keys & 0xFFFFFFFF).astype(np.int32))
        self._tfs.append(np.minimum(tf, np.iinfo(np.uint16).max).astype(np.uint16))
        self._lens.append(lens.astype(np.int32))

    def finish(self) -> dict[str, Any]:
        import bm25s

        k1, b = float(self.cfg.bm25_k1), float(self.cfg.bm25_b)
        vocab = self.tokenizer.get_vocab_dict()
        lens = np.concatenate(self._lens) if self._lens else np.zeros(0, np.int32)  # (N,)
        docs = np.concatenate(self._docs) if self._docs else np.zeros(0, np.int32)  # (P,)
        self._docs, self._lens = [], []
        terms = np.concatenate(self._terms) if self._terms else np.zeros(0, np.int32)  # (P,)
        self._terms = []
        tfs = np.concatenate(self._tfs) if self._tfs else np.zeros(0, np.uint16)  # (P,)
        self._tfs = []
        n_docs, n_vocab = len(lens), max(len(vocab), 1)
        avg_len = float(lens.mean()) if n_docs else 1.0
        df = np.bincount(terms, minlength=n_vocab)  # (V,) documents containing each term
        # Lucene idf, as bm25s computes it; unused terms get 0.
        idf = np.where(df > 0, np.log1p((n_docs - df + 0.5) / (df + 0.5)), 0.0).astype(np.float32)
        norm = (k1 * ((1.0 - b) + b * lens.astype(np.float32) / np.float32(avg_len))).astype(
            np.float32
        )  # (N,)
        del lens
        scores = np.empty(len(terms), dtype=np.float32)  # (P,)
        step = 1 << 24  # bound the float temporaries
        for i in range(0, len(terms), step):
            t = tfs[i : i + step].astype(np.float32)
            scores[i : i + step] = idf[terms[i : i + step]] * (t / (norm[docs[i : i + step]] + t))
        del tfs, norm
        # CSC by term: a stable sort keeps each column's rows in document order.
        order = np.argsort(terms, kind="stable")
        del terms
        data = scores[order]
        del scores
        indices = docs[order]
        del docs, order
        indptr = np.zeros(n_vocab + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])

        model = bm25s.BM25(k1=k1, b=b, method="lucene", backend="numpy")
        model.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}
        model.vocab_dict = vocab
        model.unique_token_ids_set = set(vocab.values())
        model.nonoccurrence_array = None
        model.save(str(self.out_dir / BM25_DIR), show_progress=False)
        return {
            "k1": k1,
            "b": b,
            "method": "lucene",
            "stemmer": "english (PyStemmer)",
            "stopwords": "en (bm25s)",
            "vocab_size": len(vocab),
            "postings": len(data),
            "avg_doc_tokens": round(avg_len, 3),
        }


class BM25Retriever:
    """Batched BM25 search over a saved index; the score matrix and passages are memory-mapped."""

    kind = "bm25"

    def __init__(self, index_dir: Path, manifest: dict[str, Any], cfg: RetrievalConfig) -> None:
        import bm25s
        from bm25s.stopwords import STOPWORDS_EN

        self.index_dir = Path(index_dir)
        self.manifest = manifest
        self.backend = pick_backend(
            cfg.bm25_backend, int(manifest.get("passages", 0)), cfg.bm25_numba_min_passages
        )
        self.threads = cfg.bm25_threads
        self.model = bm25s.BM25.load(
            str(self.index_dir / BM25_DIR),
            mmap=True,
            override_params={"backend": self.backend},
            show_progress=False,
        )
        self.vocab: dict[str, int] = self.model.vocab_dict
        self.empty_id = self.vocab.get("", 0)
        self.num_docs = int(self.model.scores["num_docs"])
        self.docs = DocStore(self.index_dir)
        self._stopwords = frozenset(STOPWORDS_EN)
        self._stemmer = _stemmer()
        self._stem_cache: dict[str, str] = {}

    def query_ids(self, query: str) -> list[int]:
        """The query's in-vocabulary term ids, as the index tokenised its passages."""
        words = [w for w in _SPLIT.findall(query.lower()) if w not in self._stopwords]
        missing = [w for w in words if w not in self._stem_cache]
        if missing:
            for w, s in zip(missing, self._stemmer.stemWords(missing), strict=True):
                if len(self._stem_cache) < 1_000_000:
                    self._stem_cache[w] = s
                else:
                    break
        ids = []
        for w in words:
            s = self._stem_cache.get(w)
            if s is None:
                s = self._stemmer.stemWord(w)
            i = self.vocab.get(s)
            if i is not None:
                ids.append(i)
        return ids or [self.empty_id]

    def search_rows(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers ``(Q, k)`` and scores ``(Q, k)``, best first."""
        k = max(1, min(int(k), self.num_docs))
        if not queries:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        res = self.model.retrieve(
            [self.query_ids(q) for q in queries],
            k=k,
            show_progress=False,
            n_threads=self.threads,
            return_as="tuple",
        )
        return np.asarray(res.documents), np.asarray(res.scores)

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        rows, scores = self.search_rows(list(queries), k)
        return self.docs.get_batch(rows, scores)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.manifest.get("name"),
            "manifest_sha256": self.manifest.get("manifest_sha256"),
            "corpus_sha256": self.manifest.get("corpus", {}).get("sha256"),
            "passages": self.num_docs,
            "params": dict(self.manifest.get("params", {}), backend=self.backend),
        }
