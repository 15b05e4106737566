"""Test doubles for rollouts: a real bm25s retriever over small corpora, and a scripted engine.

ScriptedEngine is a fake: a random tiny model never emits Search-R1 tags, so to exercise the
search / answer / invalid paths deterministically it "samples" scripted text. Its tokens are
the tokenizer's encoding of the script, cut right after the token that completes a stop
string, exactly as a real engine would return them. Everything else (tokenizer, retriever,
loop) is real.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import bm25s
import Stemmer

from sr1.retrieval.base import Passage
from sr1.rollout.engines import GenOutput, find_stop

PASSAGES = [
    ("p1", '"Zorvia"\nZorvia is a fictional country. Its capital city is Qelm, on the river Dast.'),
    ("p2", '"Qelm"\nQelm is the capital of Zorvia and was founded by Anra Voss in 1712.'),
    ("p3", '"Anra Voss"\nAnra Voss was an explorer born in the port town of Miredal.'),
    ("p4", '"Miredal"\nMiredal is a harbour town known for its glass works and lighthouse.'),
    ("p5", '"Dast"\nThe Dast is a long river flowing through Zorvia into the Kelt sea.'),
]


class BM25Retriever:
    """A real bm25s index over in-memory passages, recording every batch of queries."""

    def __init__(self, passages: Sequence[tuple[str, str]] = PASSAGES) -> None:
        self.passages = [Passage(i, c) for i, c in passages]
        self.stemmer = Stemmer.Stemmer("english")
        self.index = bm25s.BM25()
        self.index.index(
            bm25s.tokenize(
                [p.contents for p in self.passages],
                stopwords="en",
                stemmer=self.stemmer,
                show_progress=False,
            ),
            show_progress=False,
        )
        self.calls: list[list[str]] = []

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Passage]]:
        self.calls.append(list(queries))
        toks = bm25s.tokenize(
            list(queries), stopwords="en", stemmer=self.stemmer, show_progress=False
        )
        docs, scores = self.index.retrieve(toks, k=min(k, len(self.passages)), show_progress=False)
        return [
            [
                Passage(self.passages[d].id, self.passages[d].contents, float(s))
                for d, s in zip(row, srow, strict=True)
            ]
            for row, srow in zip(docs, scores, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        return {"kind": "bm25-test", "n": len(self.passages)}


class ScriptedEngine:
    """Fake engine: the trajectory whose prompt is ``prompts[i]`` gets ``scripts[i][turn]`` on its
    turn-th generate call (the last entry repeats). See the module docstring for why it exists.
    Every call's (contexts, budgets, stop strings) is recorded in ``calls``."""

    def __init__(
        self,
        tokenizer: Any,
        prompts: list[list[int]],
        scripts: list[list[str]],
        max_context: int = 4096,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.scripts = scripts
        self.turns: dict[int, int] = {}
        self.max_context = max_context
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.calls: list[tuple[list[list[int]], list[int], list[str]]] = []
        self.version = 0

    def update_weights(self, named_tensors: Any, version: int) -> None:
        self.version = int(version)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | list[int],
        stop: list[str],
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GenOutput]:
        budgets = (
            [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
        )
        self.calls.append(([list(p) for p in prompts], list(budgets), list(stop)))
        return [self._one(p, b, stop) for p, b in zip(prompts, budgets, strict=True)]

    def _one(self, context: list[int], max_new_tokens: int, stop: list[str]) -> GenOutput:
        sid = next(i for i, p in enumerate(self.prompts) if context[: len(p)] == p)
        turn = self.turns.get(sid, 0)
        self.turns[sid] = turn + 1
        script = self.scripts[sid]
        ids = self.tokenizer(script[min(turn, len(script) - 1)], add_special_tokens=False)[
            "input_ids"
        ]
        out: list[int] = []
        for t in ids[:max_new_tokens]:
            out.append(t)
            if t == self.eos_id:
                return GenOutput(out, [-0.5] * len(out), "eos", None)
            s = find_stop(self.tokenizer, out, stop)
            if s is not None:
                return GenOutput(out, [-0.5] * len(out), "stop", s)
        return GenOutput(out, [-0.5] * len(out), "length", None)
