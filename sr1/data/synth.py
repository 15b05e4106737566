"""The synthetic world: a seeded fictional encyclopedia and questions only it can answer.

``synthesize`` invents countries, cities, rivers, people and companies with made-up names,
writes each as short Wikipedia-style passages (wiki-18 JSONL: ``{"id", "contents":
"\\"Title\\"\\ntext"}``), and asks questions about them in FlashRAG format:

* single-hop: "Who founded X?", "In which city was P born?", "Which river flows through C?" …
  (the answer passage names the subject and the answer);
* two-hop: "In which city was the founder of X born?" … — the subject's passage names the
  bridge entity, the bridge's passage names the answer, and no passage in the corpus names
  both the subject and the answer (candidates that would break this are dropped and counted).

BM25 is useful but not trivial: people share first names and surnames, companies share name
stems, passages mention other cities (offices, a neighbour, where someone studied), facts are
restated in paraphrase passages with other wording, and distractor passages (fairs, prizes,
court cases, families, expeditions, disambiguation pages) mention the same names without the
asked facts. Passages are kept short (14-35 words, ~50 Qwen tokens; the short ones are disambiguation pages) and answers short (1-3 words): the
default demo trains a 135M model on 2 CPU cores.

Each question's ``metadata`` carries ``hops``, ``relation``, ``subject``, ``bridge``, the gold
search ``queries`` (one per hop) and the ``support`` passage ids (one per hop), from which
``sr1 sft`` builds well-formed trajectories. The same seed gives byte-identical files.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sr1 import paths
from sr1.data.synth_text import distractors, entity_passages, questions
from sr1.data.synth_world import SynthConfig, build_world
from sr1.errors import Sr1Error
from sr1.io import write_json_atomic, write_jsonl_atomic

__all__ = ["SynthConfig", "mentions", "synthesize"]


def _leaks(qs: list[dict], contents: list[str]) -> list[bool]:
    """True for a two-hop question whose subject and answer share a passage (one search would do)."""
    out = []
    for x in qs:
        m = x["metadata"]
        if m["hops"] < 2:
            out.append(False)
            continue
        subj, ans = m["subject"], x["golden_answers"]
        out.append(any(mentions(c, subj) and any(mentions(c, a) for a in ans) for c in contents))
    return out


def mentions(text: str, name: str) -> bool:
    """Whether ``name`` occurs in ``text`` as a whole word sequence (not inside a longer word)."""
    return name in text and re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def _split(qs: list[dict], cfg: SynthConfig, rng: random.Random) -> dict[str, list[dict]]:
    """test, dev, then train, each half two-hop as far as the world has two-hop questions."""
    if cfg.n_dev + cfg.n_test >= len(qs):
        raise Sr1Error(
            f"the world has {len(qs)} questions; n_dev + n_test = {cfg.n_dev + cfg.n_test} "
            "leaves nothing to train on",
            hint="raise --n-entities or lower --n-dev/--n-test",
        )
    groups = [[x for x in qs if x["metadata"]["hops"] == h] for h in (1, 2)]
    for g in groups:
        rng.shuffle(g)

    def take(size: int) -> list[dict]:
        # half two-hop where the world has enough of them, the rest single-hop
        n2 = min(size // 2, len(groups[1]))
        n2 = max(n2, size - len(groups[0]))
        n1 = size - n2
        part = groups[0][:n1] + groups[1][:n2]
        groups[0], groups[1] = groups[0][n1:], groups[1][n2:]
        return part

    test, dev = take(cfg.n_test), take(cfg.n_dev)
    left = len(groups[0]) + len(groups[1])
    train = take(left if cfg.n_train is None else min(cfg.n_train, left))
    out = {"train": train, "dev": dev, "test": test}
    for name in ("train", "dev", "test"):
        rng.shuffle(out[name])
        for i, x in enumerate(out[name]):
            x["id"] = f"synth-{name}-{i:05d}"
    return out


def synthesize(
    out_dir: Path | None = None,
    seed: int = 0,
    n_entities: int = 300,
    n_train: int | None = 800,
    n_dev: int = 100,
    n_test: int = 200,
    paraphrase_rate: float = 0.5,
    distractor_rate: float = 1.0,
    prepare_data: bool = True,
) -> dict[str, Any]:
    """Write the world under ``out_dir`` (default ``$SR1_HOME/corpora/synth``) and return stats.

    Files: ``corpus.jsonl`` (wiki-18 JSONL), ``qa/synth/{train,dev,test}.jsonl`` (FlashRAG
    rows with ``metadata``), ``world.json`` (the entities, the config and the counts). With
    ``prepare_data`` the QA is also prepared into ``$SR1_HOME/data/synth/`` so
    ``load_split("synth", split)`` works.
    """
    cfg = SynthConfig(seed, n_entities, n_train, n_dev, n_test, paraphrase_rate, distractor_rate)
    out = Path(out_dir).expanduser() if out_dir else paths.corpora_dir() / "synth"
    rng = random.Random(seed)
    world = build_world(cfg, rng)
    passages = entity_passages(world, cfg, rng) + distractors(world, cfg, rng)
    rng.shuffle(passages)
    pid: dict[str, str] = {}
    for i, p in enumerate(passages):
        p.pid = str(i)
        if p.key:
            pid[p.key.removeprefix("primary:")] = p.pid
    candidates = questions(world, pid, rng)
    leaks = _leaks(candidates, [p.contents for p in passages])
    qs = [x for x, bad in zip(candidates, leaks, strict=True) if not bad]
    splits = _split(qs, cfg, rng)

    corpus = out / "corpus.jsonl"
    write_jsonl_atomic(corpus, ({"id": p.pid, "contents": p.contents} for p in passages))
    qa_dir = out / "qa"
    for name, rows in splits.items():
        write_jsonl_atomic(
            qa_dir / "synth" / f"{name}.jsonl",
            (
                {
                    "id": x["id"],
                    "question": x["question"],
                    "golden_answers": x["golden_answers"],
                    "metadata": x["metadata"],
                }
                for x in rows
            ),
        )
    words = [len(p.text.split()) for p in passages]
    stats = {
        "out_dir": str(out),
        "corpus": str(corpus),
        "qa_dir": str(qa_dir),
        "seed": seed,
        "entities": {k: len(v) for k, v in world.items()},
        "passages": len(passages),
        "passage_words": {
            "min": min(words),
            "mean": round(sum(words) / len(words), 1),
            "max": max(words),
        },
        "questions": {k: len(v) for k, v in splits.items()},
        "two_hop": {k: sum(x["metadata"]["hops"] == 2 for x in v) for k, v in splits.items()},
        "dropped_two_hop_leaks": sum(leaks),
    }
    write_json_atomic(
        out / "world.json",
        {
            "config": asdict(cfg),
            "stats": {k: v for k, v in stats.items() if k not in ("out_dir", "corpus", "qa_dir")},
            "entities": {k: [{"name": e.name, **e.attrs} for e in v] for k, v in world.items()},
        },
    )
    if prepare_data:
        from sr1.data.prepare import prepare

        stats["prepared"] = prepare(["synth"], source_dir=qa_dir, progress=False)["synth"]
    return stats
