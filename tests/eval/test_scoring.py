"""The shared scorer against SQuAD v1.1's official normalisation on a table of tricky cases.

The reference below is the official SQuAD v1.1 evaluation logic (lower, drop ASCII
punctuation, drop a/an/the, collapse whitespace; token F1 with the max over golden answers),
restated here so a change to sr1.scoring that departs from it fails loudly. sr1's one
deliberate departure is NFKC unicode folding (full-width letters, ligatures), tested apart.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from sr1.scoring import (
    answer_in_text,
    cover_exact_match,
    exact_match,
    extract_answer,
    f1_score,
    normalize_answer,
    score,
)


def squad_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_em(pred: str, golds: list[str]) -> float:
    return float(max(squad_normalize(pred) == squad_normalize(g) for g in golds))


def squad_f1(pred: str, golds: list[str]) -> float:
    best = 0.0
    for g in golds:
        p, t = squad_normalize(pred).split(), squad_normalize(g).split()
        same = sum((Counter(p) & Counter(t)).values())
        if same:
            prec, rec = same / len(p), same / len(t)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


# (prediction, golden answers, EM, cover-EM, F1)
CASES = [
    ("The Eiffel Tower", ["eiffel tower"], 1.0, 1.0, 1.0),  # article + case
    ("an apple", ["Apple"], 1.0, 1.0, 1.0),
    ("U.S.A.", ["USA"], 1.0, 1.0, 1.0),  # punctuation inside tokens
    ("1,000", ["1000"], 1.0, 1.0, 1.0),
    ("Jean-Paul", ["jeanpaul"], 1.0, 1.0, 1.0),  # hyphen dropped, not split
    ("Jean Paul", ["Jean-Paul"], 0.0, 0.0, 0.0),
    ("  Barack \n  Obama ", ["barack obama"], 1.0, 1.0, 1.0),  # whitespace
    ("theater", ["the ater"], 0.0, 0.0, 0.0),  # 'the' only as a whole word
    ("Paris, France", ["Paris"], 0.0, 1.0, 2 / 3),  # cover-EM: gold span inside prediction
    ("Apple Inc.", ["Apple", "Apple Inc"], 1.0, 1.0, 1.0),  # multiple golds: best one
    ("1961", ["August 4, 1961", "1961"], 1.0, 1.0, 1.0),
    ("August 1961", ["August 4, 1961"], 0.0, 0.0, 0.8),
    ("the the cat cat", ["cat"], 0.0, 1.0, 2 / 3),  # F1 counts repeated tokens once each
    ("no", ["yes", "no"], 1.0, 1.0, 1.0),
    ("Café", ["CAFÉ"], 1.0, 1.0, 1.0),  # unicode case folding
    ("Cafe", ["Café"], 0.0, 0.0, 0.0),  # accents are kept (as in SQuAD)
    ("Zürich", ["zürich"], 1.0, 1.0, 1.0),
    ("“Hamlet”", ["Hamlet"], 0.0, 0.0, 0.0),  # curly quotes are not ASCII punctuation
    ("Hamlet!", ["hamlet"], 1.0, 1.0, 1.0),
    ("ann", ["an"], 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize(("pred", "golds", "em", "cover", "f1"), CASES)
def test_tricky_cases_match_squad(
    pred: str, golds: list[str], em: float, cover: float, f1: float
) -> None:
    assert normalize_answer(pred) == squad_normalize(pred)
    assert exact_match(pred, golds) == em == squad_em(pred, golds)
    assert f1_score(pred, golds) == pytest.approx(f1)
    assert f1_score(pred, golds) == pytest.approx(squad_f1(pred, golds))
    assert cover_exact_match(pred, golds) == cover


def test_nfkc_folding_is_the_one_departure() -> None:
    # full-width letters and ligatures fold to ASCII before SQuAD normalisation
    assert exact_match("Ｐａｒｉｓ", ["Paris"]) == 1.0 and squad_em("Ｐａｒｉｓ", ["Paris"]) == 0.0
    assert exact_match("ﬁre", ["fire"]) == 1.0


def test_missing_answer_scores_zero() -> None:
    assert exact_match(None, ["x"]) == 0.0 and f1_score(None, ["x"]) == 0.0
    assert cover_exact_match(None, ["x"]) == 0.0


def test_extract_answer_takes_the_last_complete_answer_from_the_response() -> None:
    resp = "<think>x</think><answer> Rome </answer> then <answer>\n Paris \n</answer>"
    assert extract_answer(resp) == "Paris"
    assert extract_answer("<answer> unfinished") is None
    assert extract_answer("no tags at all") is None
    s = score("<think>t</think>\n<answer> the Eiffel tower </answer>", ["Eiffel Tower"])
    assert s["answer"] == "the Eiffel tower" and s["em"] == 1.0 and s["well_formed"] == 1.0
    s = score("Eiffel Tower", ["Eiffel Tower"])  # no <answer>: nothing to score
    assert s["answer"] is None and s["em"] == 0.0 and s["well_formed"] == 0.0


def test_answer_in_text_needs_whole_tokens() -> None:
    docs = 'Doc 1(Title: "Paris") Paris is the capital of France.\n'
    assert answer_in_text(docs, ["the capital"]) == 1.0
    assert answer_in_text(docs, ["Pari"]) == 0.0
    assert answer_in_text(docs, ["Berlin", "france"]) == 1.0


def test_hop_groups_come_from_the_dataset_registry_or_the_row():
    from sr1.eval.metrics import hop_group

    assert [hop_group(d) for d in ("nq", "popqa", "hotpotqa", "bamboogle")] == [
        "single", "single", "multi", "multi",
    ]  # fmt: skip
    assert hop_group("synth") == "mixed" and hop_group("my-own-set") == "unknown"
    assert hop_group("synth", {"hops": 2}) == "multi" and hop_group("nq", {"hops": 1}) == "single"
