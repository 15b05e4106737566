"""Build, list and open named indices under ``$SR1_HOME/indices/<name>/``.

A build streams the corpus once in chunks: every chunk goes to the passage store and to the
retriever kind's builder. Work happens in ``indices/.<name>.building/`` and is renamed into
place only when complete, so a crash never leaves a half index under the real name; dense
builds resume from that folder (their embedding chunks survive). Each index carries a
``manifest.json``: corpus path and sha256, passage count, retriever and parameters, build
time, size on disk, peak memory, sr1 version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import sr1
from sr1 import paths
from sr1.config import RetrievalConfig
from sr1.errors import NotFoundError, Sr1Error
from sr1.io import write_json_atomic
from sr1.progress import ProgressFactory
from sr1.progress import resolve as resolve_progress
from sr1.registry import Registry
from sr1.retrieval.base import Passage, Retriever
from sr1.retrieval.corpus import corpus_format, file_sha256, iter_corpus, resolve_corpus
from sr1.retrieval.docstore import DocStoreWriter

MANIFEST = "manifest.json"
BUILD_STATE = "build.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class IndexBuilder(Protocol):
    def add(self, start: int, batch: list[Passage]) -> None: ...

    def finish(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RetrieverKind:
    """Where a retriever kind's builder and retriever classes live (imported on use)."""

    module: str
    builder: str
    retriever: str
    resumable: bool

    def load(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.module), attr)


KINDS: Registry[RetrieverKind] = Registry("retriever")
KINDS.add("bm25", RetrieverKind("sr1.retrieval.bm25", "BM25Builder", "BM25Retriever", False))
KINDS.add("dense", RetrieverKind("sr1.retrieval.dense", "DenseBuilder", "DenseRetriever", True))


def index_dir(name: str) -> Path:
    return paths.indices_dir() / name


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise Sr1Error(
            f"invalid index name {name!r}",
            hint="use letters, digits, '.', '_' or '-' (e.g. wiki18, synth, my-corpus)",
        )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _manifest_hash(m: dict[str, Any]) -> str:
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def build_index(
    name: str,
    corpus_file: str | os.PathLike[str] | None = None,
    retriever: str = "bm25",
    encoder: str | None = None,
    cfg: RetrievalConfig | None = None,
    progress: ProgressFactory | None = None,
    skip_bad_lines: bool = False,
    download: bool = False,
) -> dict[str, Any]:
    """Build index ``name`` over a corpus and return its manifest.

    ``corpus_file`` is any JSONL/TSV corpus; without it ``name`` must be a named corpus
    (``synth``, ``wiki18``). ``retriever`` is ``bm25`` or ``dense`` (``encoder`` defaults to
    ``cfg.encoder``). An existing index of the same name is replaced only on success.
    ``skip_bad_lines`` (or ``cfg.skip_bad_lines``) skips malformed corpus lines, counting them
    in the manifest, instead of stopping at the first one. ``download`` lets ``wiki18`` be
    fetched from the hub when no local copy is known. ``progress`` reports passages indexed
    (:mod:`sr1.progress`; None or False: silent).
    """
    _check_name(name)
    cfg = cfg or RetrievalConfig()
    if skip_bad_lines and not cfg.skip_bad_lines:
        cfg = dataclasses.replace(cfg, skip_bad_lines=True)
    kind = KINDS.get(retriever)
    corpus_path = resolve_corpus(
        name, corpus_file, wiki18_path=cfg.wiki18_corpus, download=download
    )
    if corpus_file is not None and name == "wiki18":
        _remember_wiki18(corpus_path)
    fmt = corpus_format(corpus_path)
    if retriever == "dense":
        encoder = encoder or cfg.encoder
    t0 = time.perf_counter()
    corpus_sha = file_sha256(corpus_path)

    staging = paths.indices_dir() / f".{name}.building"
    state = {
        "corpus_sha256": corpus_sha,
        "retriever": retriever,
        "encoder": encoder,
        "build_chunk": cfg.build_chunk,
        "passage_prefix": cfg.passage_prefix if retriever == "dense" else None,
        "encode_max_length": cfg.encode_max_length if retriever == "dense" else None,
        "skip_bad_lines": cfg.skip_bad_lines,
    }
    old_state = None
    if (staging / BUILD_STATE).is_file():
        old_state = json.loads((staging / BUILD_STATE).read_text(encoding="utf-8"))
    if staging.exists() and not (kind.resumable and old_state == state):
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    write_json_atomic(staging / BUILD_STATE, state)

    stats: dict[str, int] = {}
    try:
        params, n_docs = _build_into(
            staging,
            name,
            retriever,
            kind,
            encoder,
            corpus_path,
            cfg,
            stats,
            resolve_progress(progress),
        )
    except BaseException:
        if not kind.resumable:  # nothing worth keeping; dense keeps its embedding chunks
            shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / BUILD_STATE).unlink()
    build_s = time.perf_counter() - t0

    manifest: dict[str, Any] = {
        "name": name,
        "retriever": retriever,
        "params": params,
        "corpus": {
            "path": str(corpus_path),
            "sha256": corpus_sha,
            "format": fmt,
            "size_bytes": corpus_path.stat().st_size,
            "skipped_lines": stats.get("skipped", 0),
            "skipped_undecodable": stats.get("undecodable", 0),
        },
        "passages": n_docs,
        "build_time_s": round(build_s, 3),
        "passages_per_s": round(n_docs / build_s, 1) if build_s > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "sr1_version": sr1.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
    }
    manifest["size_bytes"] = _dir_size(staging)  # the manifest itself is a rounding error
    manifest["manifest_sha256"] = _manifest_hash(manifest)
    write_json_atomic(staging / MANIFEST, manifest)
    _swap_into_place(staging, index_dir(name))
    return {**manifest, "path": str(index_dir(name))}


def _remember_wiki18(path: Path) -> None:
    """Link a user's wiki-18 file into ``$SR1_HOME/corpora/wiki18`` so later builds find it."""
    name = Path(path).name.lower()
    gz = ".gz" if name.endswith(".gz") else ""
    canonical = ("wiki-18.jsonl" if corpus_format(path) == "jsonl" else "psgs_w100.tsv") + gz
    link = paths.corpora_dir() / "wiki18" / canonical
    if link.resolve() == Path(path).resolve():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(path).resolve())


def _build_into(
    staging: Path,
    name: str,
    retriever: str,
    kind: RetrieverKind,
    encoder: str | None,
    corpus_path: Path,
    cfg: RetrievalConfig,
    stats: dict[str, int],
    progress: ProgressFactory,
) -> tuple[dict[str, Any], int]:
    """Stream the corpus in chunks into the passage store and the builder; (params, passages)."""
    if retriever == "dense":
        builder: IndexBuilder = kind.load(kind.builder)(staging, cfg, encoder)
    else:
        builder = kind.load(kind.builder)(staging, cfg)
    docs = DocStoreWriter(staging)
    chunk: list[Passage] = []
    with progress(f"indexing {name} ({retriever})", None) as advance:

        def flush() -> None:
            builder.add(len(docs), chunk)
            for p in chunk:
                docs.add(p.id, p.contents)
            advance(len(chunk))
            chunk.clear()

        try:
            for p in iter_corpus(corpus_path, skip_bad_lines=cfg.skip_bad_lines, stats=stats):
                chunk.append(p)
                if len(chunk) >= cfg.build_chunk:
                    flush()
            if chunk:
                flush()
        finally:
            docs.close()
        if len(docs) == 0:
            skipped = stats.get("skipped", 0)
            undecodable = stats.get("undecodable", 0)
            raise Sr1Error(
                f"{corpus_path}: the corpus has no passages"
                + (f" ({skipped} malformed lines skipped" if skipped else "")
                + (f", {undecodable} of them not UTF-8" if skipped and undecodable else "")
                + (")" if skipped else "")
            )
        advance(0, description=f"finishing {name} ({retriever})")
        return builder.finish(), len(docs)


def _swap_into_place(staging: Path, final: Path) -> None:
    """Rename the finished staging folder to ``final``; an old index is removed only after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_manifest(name_or_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an index given by name (or index folder)."""
    d = Path(name_or_dir)
    if not (d / MANIFEST).is_file():
        d = index_dir(str(name_or_dir)) if _NAME.match(str(name_or_dir)) else d
    f = d / MANIFEST
    if not f.is_file():
        built = [m["name"] for m in list_indices()]
        raise NotFoundError(
            f"no index named {str(name_or_dir)!r}; built indices: {', '.join(built) or 'none'}",
            hint=f"build it with `sr1 index build {name_or_dir}` "
            "(add --corpus-file PATH for a corpus that is not synth or wiki18)",
        )
    m = json.loads(f.read_text(encoding="utf-8"))
    m["path"] = str(d)
    return m


def list_indices() -> list[dict[str, Any]]:
    """Manifests of every built index under ``$SR1_HOME/indices``, sorted by name."""
    out = []
    for d in sorted(paths.indices_dir().iterdir()):
        if d.name.startswith(".") or not (d / MANIFEST).is_file():
            continue
        m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        m["path"] = str(d)
        out.append(m)
    return out


def open_index(name: str, cfg: RetrievalConfig | None = None) -> Retriever:
    """A retriever over a built index (by name or folder); unknown names list the built ones."""
    m = load_manifest(name)
    kind = KINDS.get(m["retriever"])
    return kind.load(kind.retriever)(Path(m["path"]), m, cfg or RetrievalConfig())
