"""The synthetic world: deterministic, answerable from the corpus, two-hop needs two passages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sr1.data.prepare import load_split
from sr1.data.synth import synthesize
from sr1.errors import Sr1Error

FILES = ("corpus.jsonl", "qa/synth/train.jsonl", "qa/synth/dev.jsonl", "qa/synth/test.jsonl")


def _word_in(text: str, name: str) -> bool:
    return name in text and re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict, dict[str, str], list[dict]]:
    """One default-size world: (dir, stats, passage id -> contents, every question)."""
    out = tmp_path_factory.mktemp("synth") / "w"
    stats = synthesize(out, seed=0, prepare_data=False)
    corpus = {}
    for line in (out / "corpus.jsonl").open(encoding="utf-8"):
        r = json.loads(line)
        assert set(r) == {"id", "contents"} and r["id"] not in corpus
        corpus[r["id"]] = r["contents"]
    qs = []
    for split in ("train", "dev", "test"):
        qs += [
            dict(json.loads(x), split=split)
            for x in (out / "qa" / "synth" / f"{split}.jsonl").open()
        ]
    return out, stats, corpus, qs


def test_same_seed_same_bytes_other_seed_other_world(tmp_path: Path, world) -> None:
    out0 = world[0]
    again = synthesize(tmp_path / "again", seed=0, prepare_data=False)
    for f in (*FILES, "world.json"):
        assert (tmp_path / "again" / f).read_bytes() == (out0 / f).read_bytes(), f
    assert again["questions"] == world[1]["questions"]
    synthesize(tmp_path / "s1", seed=1, prepare_data=False)
    for f in FILES:
        assert (tmp_path / "s1" / f).read_bytes() != (out0 / f).read_bytes(), f


def test_sizes_splits_and_shapes(world) -> None:
    _, stats, corpus, qs = world
    assert stats["questions"]["dev"] == 100 and stats["questions"]["test"] == 200
    assert stats["questions"]["train"] == 800
    assert 500 <= len(corpus) <= 1500
    for split in ("dev", "test"):  # half two-hop in the eval splits
        assert stats["two_hop"][split] * 2 == stats["questions"][split]
    assert 0.35 <= stats["two_hop"]["train"] / 800 <= 0.5
    ids = [q["id"] for q in qs]
    assert len(set(ids)) == len(ids)
    texts = [q["question"] for q in qs]
    assert len(set(texts)) == len(texts)  # no question in two splits
    for c in corpus.values():
        title, text = c.split("\n", 1)
        assert title.startswith('"') and title.endswith('"')
        assert 8 <= len(text.split()) <= 60
    for q in qs:
        assert 1 <= len(q["golden_answers"][0].split()) <= 3
        m = q["metadata"]
        assert m["data_source"] == "synth" and m["hops"] in (1, 2)
        assert len(m["queries"]) == len(m["support"]) == m["hops"]


def test_every_answer_is_in_its_supporting_passage(world) -> None:
    _, _, corpus, qs = world
    for q in qs:
        m = q["metadata"]
        first, last = corpus[m["support"][0]], corpus[m["support"][-1]]
        assert _word_in(first, m["subject"]), q
        assert _word_in(last, q["golden_answers"][0]), q
        assert all(any(_word_in(c, a) for c in corpus.values()) for a in q["golden_answers"])


def test_two_hop_questions_need_two_passages(world) -> None:
    _, _, corpus, qs = world
    two = [q for q in qs if q["metadata"]["hops"] == 2]
    assert len(two) > 400
    for q in two:
        m = q["metadata"]
        a, b = m["support"]
        assert a != b
        assert _word_in(corpus[a], m["bridge"]) and _word_in(corpus[b], m["bridge"])
        assert not any(_word_in(corpus[a], ans) for ans in q["golden_answers"]), q
        assert not _word_in(corpus[b], m["subject"]), q
        both = [
            pid
            for pid, c in corpus.items()
            if _word_in(c, m["subject"]) and any(_word_in(c, ans) for ans in q["golden_answers"])
        ]
        assert both == [], (q, both)


def test_bm25_useful_but_not_trivial(world, sr1_home: Path) -> None:
    """With a real BM25 index: the question alone finds single-hop answers most of the time
    but never the two-hop answer; the gold queries find their support passages."""
    from sr1.retrieval.index import build_index, open_index

    out, _, _, qs = world
    build_index("synthw", corpus_file=out / "corpus.jsonl", progress=False)
    r = open_index("synthw")
    test = [q for q in qs if q["split"] == "test"]
    hits = r.search([q["question"] for q in test], k=3)
    one = [
        q["metadata"]["support"][-1] in [p.id for p in ps]
        for q, ps in zip(test, hits, strict=True)
        if q["metadata"]["hops"] == 1
    ]
    two = [
        q["metadata"]["support"][-1] in [p.id for p in ps]
        for q, ps in zip(test, hits, strict=True)
        if q["metadata"]["hops"] == 2
    ]
    assert 0.6 <= sum(one) / len(one) < 0.99
    assert sum(two) / len(two) <= 0.05
    flat = [
        (qq, sp)
        for q in test
        for qq, sp in zip(q["metadata"]["queries"], q["metadata"]["support"], strict=True)
    ]
    gold = r.search([qq for qq, _ in flat], k=3)
    rate = sum(sp in [p.id for p in ps] for (_, sp), ps in zip(flat, gold, strict=True)) / len(flat)
    assert rate >= 0.85


def test_default_location_and_load_split(sr1_home: Path) -> None:
    stats = synthesize(n_entities=80, n_dev=10, n_test=20)
    assert Path(stats["corpus"]) == sr1_home / "corpora" / "synth" / "corpus.jsonl"
    assert stats["prepared"]["test"]["rows"] == 20
    rows = load_split("synth", "test")
    assert len(rows) == 20 and {r["data_source"] for r in rows} == {"synth"}
    assert all(isinstance(r["metadata"], dict) and r["metadata"]["queries"] for r in rows)
    assert rows[0]["prompt"].endswith(f"Question: {rows[0]['question']}\n")
    assert len(load_split("synth", "train")) == stats["questions"]["train"]


def test_too_many_eval_questions_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(Sr1Error, match="leaves nothing to train on"):
        synthesize(tmp_path, n_entities=40, n_dev=500, n_test=500, prepare_data=False)
