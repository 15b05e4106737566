"""Fixtures for retrieval tests: the real sample corpus, NQ dev questions, one shared BM25 index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_corpus(shared_data: Path) -> Path:
    p = shared_data / "corpus" / "wiki-sample.jsonl"
    if not p.is_file():
        pytest.skip(f"{p} is absent")
    return p


@pytest.fixture(scope="session")
def nq_dev(shared_data: Path) -> list[dict]:
    p = shared_data / "qa" / "nq" / "dev.jsonl"
    if not p.is_file():
        pytest.skip(f"{p} is absent")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def bm25_index(sample_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real BM25 index over the whole 33k-passage sample, built once; its folder path."""
    from sr1.retrieval.index import build_index

    home = tmp_path_factory.mktemp("bm25home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SR1_HOME", str(home))
        m = build_index("wiki-sample", corpus_file=sample_corpus, progress=False)
    return Path(m["path"])


def write_slice(src: Path, dst: Path, n: int, start: int = 0) -> Path:
    """The lines ``start .. start+n`` of a JSONL corpus, as a new file."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= start + n:
                break
            if i >= start:
                out.write(line)
    return dst
