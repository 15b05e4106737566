"""Retrieval quality on QA data: answer-in-top-k rate, and what random passages would score.

A question counts as answered when a normalised golden answer occurs in one of its top-k
passages as whole tokens (``sr1.tasks.qa.answer_in_text``, NFKC-folded: a retrieval measure,
stricter than the substring rule Search-R1's reward uses). The chance rate is
the expected rate for k passages drawn at random from the same corpus, computed exactly from
how many passages contain each question's answer.
"""

from __future__ import annotations

import re
import string
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from math import comb
from typing import Any

from sr1.retrieval.base import Passage, Retriever
from sr1.tasks.qa import answer_in_text, normalize_answer


def _norm_unicode(s: str) -> str:
    return unicodedata.normalize("NFKC", s)


def answer_hits(
    results: Sequence[Sequence[Passage]], golden: Sequence[Sequence[str]]
) -> list[float]:
    """Per question, 1.0 when a golden answer appears in its retrieved passages."""
    return [
        answer_in_text("\n".join(p.contents for p in ps), g, nfkc=True)
        for ps, g in zip(results, golden, strict=True)
    ]


_DROP_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def _fast_normalize(s: str) -> str:
    """``sr1.tasks.qa.normalize_answer`` with the punctuation loop done by ``str.translate``."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_DROP_PUNCT)).split())


def chance_rate(passages: Iterable[Passage], golden: Sequence[Sequence[str]], k: int) -> float:
    """Expected answer-in-top-k rate for k passages drawn uniformly without replacement."""
    texts = [f" {_fast_normalize(_norm_unicode(p.contents))} " for p in passages]
    n = len(texts)
    if n == 0 or not golden:
        return 0.0
    k = min(k, n)
    # One big string; str.find runs in C, and each hit jumps to the next passage so a passage
    # counts once however often it contains the answer.
    raw = [t.encode("utf-8") for t in texts]  # bytes.find is several times faster than str.find
    starts = [0]
    for t in raw[:-1]:
        starts.append(starts[-1] + len(t) + 1)
    big = b"\x00".join(raw)
    total = 0.0
    for g in golden:
        needles = {
            f" {normalize_answer(_norm_unicode(a))} ".encode() for a in g if normalize_answer(a)
        }
        containing: set[int] = set()
        for nd in needles:
            pos = big.find(nd)
            while pos >= 0:
                i = bisect_right(starts, pos) - 1
                containing.add(i)
                nxt = starts[i + 1] if i + 1 < n else len(big)
                pos = big.find(nd, nxt)
        total += 1.0 - comb(n - len(containing), k) / comb(n, k)
    return total / len(golden)


def answer_recall(
    retriever: Retriever, rows: Sequence[dict[str, Any]], k: int = 3, batch_size: int = 256
) -> dict[str, float]:
    """Answer-in-top-k rate of ``retriever`` over QA rows ``{"question", "golden_answers"}``."""
    hits: list[float] = []
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        res = retriever.search([r["question"] for r in part], k)
        hits += answer_hits(res, [r["golden_answers"] for r in part])
    return {"n": len(hits), "k": k, "answer_in_topk": sum(hits) / max(len(hits), 1)}
