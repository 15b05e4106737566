"""The shared scorer against SQuAD v1.1's official normalisation on a table of tricky cases.

The reference below is the official SQuAD v1.1 evaluation logic (lower, drop ASCII
punctuation, drop a/an/the, collapse whitespace; token F1 with the max over golden answers),
restated here so a change to sr1.tasks.qa that departs from it fails loudly. Cover-EM is
FlashRAG's/Search-R1's substring rule; F1 has FlashRAG's yes/no/noanswer rule; NFKC unicode
folding is a switch, off by default (exact parity), tested apart.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from sr1.tasks import task_for
from sr1.tasks.qa import (
    answer_in_text,
    cover_exact_match,
    exact_match,
    extract_answer,
    f1_score,
    normalize_answer,
)


def score(response: str, golden: list[str]) -> dict:
    return task_for("nq").score(response, golden)


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
    # 'the' only as a whole word; cover-EM is a substring test ("ater" in "theater"), as in
    # FlashRAG's Sub_ExactMatch and Search-R1's subem_check
    ("theater", ["the ater"], 0.0, 1.0, 0.0),
    ("Paris, France", ["Paris"], 0.0, 1.0, 2 / 3),  # cover-EM: gold span inside prediction
    ("Apple Inc.", ["Apple", "Apple Inc"], 1.0, 1.0, 1.0),  # multiple golds: best one
    ("1961", ["August 4, 1961", "1961"], 1.0, 1.0, 1.0),
    ("August 1961", ["August 4, 1961"], 0.0, 0.0, 0.8),
    ("the the cat cat", ["cat"], 0.0, 1.0, 2 / 3),  # F1 counts repeated tokens once each
    ("no", ["yes", "no"], 1.0, 1.0, 1.0),
    ("Café", ["CAFÉ"], 1.0, 1.0, 1.0),  # unicode case folding
    ("Cafe", ["Café"], 0.0, 0.0, 0.0),  # accents are kept (as in SQuAD)
    ("Zürich", ["zürich"], 1.0, 1.0, 1.0),
    ("“Hamlet”", ["Hamlet"], 0.0, 1.0, 0.0),  # curly quotes are not ASCII punctuation
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


def test_nfkc_folding_is_a_switch_off_by_default() -> None:
    # off: exactly SQuAD/Search-R1; on: full-width letters and ligatures fold to ASCII first
    assert exact_match("Ｐａｒｉｓ", ["Paris"]) == 0.0 == squad_em("Ｐａｒｉｓ", ["Paris"])
    assert exact_match("Ｐａｒｉｓ", ["Paris"], nfkc=True) == 1.0
    assert exact_match("ﬁre", ["fire"]) == 0.0 and exact_match("ﬁre", ["fire"], nfkc=True) == 1.0


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
    assert s["answer_in_docs"] is None  # nothing retrieved


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


# -- FlashRAG's F1 rule and Search-R1's format check, restated ---------------------------------


def flashrag_f1(pred: str, golds: list[str]) -> float:
    """FlashRAG F1_Score.token_level_scores' f1, restated."""
    best = 0.0
    for g in golds:
        p, t = squad_normalize(pred), squad_normalize(g)
        if p in ("yes", "no", "noanswer") and p != t:
            continue
        if t in ("yes", "no", "noanswer") and p != t:
            continue
        same = sum((Counter(p.split()) & Counter(t.split())).values())
        if same:
            prec, rec = same / len(p.split()), same / len(t.split())
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


@pytest.mark.parametrize(
    ("pred", "golds", "want"),
    [
        ("yes", ["yes"], 1.0),
        ("yes it is", ["yes"], 0.0),  # gold yes: only an exact yes scores
        ("no", ["no way"], 0.0),  # prediction no: only a gold no scores
        ("noanswer", ["no answer"], 0.0),
        ("Paris France", ["Paris"], 2 / 3),
    ],
)
def test_f1_has_flashrags_yes_no_rule(pred: str, golds: list[str], want: float) -> None:
    assert f1_score(pred, golds) == pytest.approx(want) == pytest.approx(flashrag_f1(pred, golds))


def search_r1_is_valid_sequence(content: str) -> bool:
    """Search-R1's qa_em_format.is_valid_sequence on the text after the assistant marker,
    restated from its state table."""
    for tag in ("think", "search", "information", "answer"):
        if len(re.findall(f"<{tag}>", content)) != len(re.findall(f"</{tag}>", content)):
            return False
    state = "start"
    table = {
        ("<think>", "start"), ("<think>", "information"), ("</think>", "in_think"),
        ("<search>", "after_think"), ("</search>", "in_search"),
        ("<information>", "after_search"), ("</information>", "in_information"),
        ("<answer>", "after_think"), ("</answer>", "in_answer"),
    }  # fmt: skip
    after = {
        "<think>": "in_think", "</think>": "after_think", "<search>": "in_search",
        "</search>": "after_search", "<information>": "in_information",
        "</information>": "information", "<answer>": "in_answer", "</answer>": "end",
    }  # fmt: skip
    for part in re.split(r"(</?(?:think|search|information|answer)>)", content):
        if not part.strip():
            continue
        if re.match(r"</?(?:think|search|information|answer)>", part):
            if (part, state) not in table:
                return False
            state = after[part]
        elif state in ("start", "after_think", "after_search", "information", "end"):
            return False
    return state == "end"


SEQS = [
    ("<think> a </think>\n<answer> x </answer>", True),
    ("<think> a </think>\n<search> q </search>\n\n<information>D</information>\n\n"
     "<think> b </think>\n<answer> x </answer>", True),
    ("<think> a </think><search> q </search><think> b </think><answer> x </answer>", False),
    ("<answer> x </answer>", False),  # no think first
    ("<think> a </think> so <answer> x </answer>", False),  # text between tags
    ("<think> a </think>\n<answer> x </answer> done", False),  # text after the answer
    ("<think> a </think>\n<search> q </search>\n\n<information>D</information>\n\n"
     "<answer> x </answer>", False),  # must think again after the information
    ("<think> a <search> q </search> </think>\n<answer> x </answer>", False),
    ("<think> a </think>\n<answer> x", False),  # unbalanced
    ("<think> a </think>\n<search> q </search>", False),  # no answer
]  # fmt: skip


@pytest.mark.parametrize(("text", "valid"), SEQS)
def test_well_formed_is_search_r1s_is_valid_sequence(text: str, valid: bool) -> None:
    assert search_r1_is_valid_sequence(text) is valid
    assert score(text, ["x"])["well_formed"] == float(valid)


def test_forced_answers_are_never_well_formed_and_specials_are_ignored() -> None:
    qa = task_for("nq")
    ok = "<think> a </think>\n<answer> x </answer>"
    assert qa.score(ok, ["x"], forced=True)["well_formed"] == 0.0
    from sr1.tasks import ScoreOptions

    eos = ok + "<|im_end|>"
    assert qa.score(eos, ["x"])["well_formed"] == 0.0
    opts = ScoreOptions(special_tokens=("<|im_end|>",))
    assert qa.score(eos, ["x"], opts=opts)["well_formed"] == 1.0


def test_answer_in_docs_is_search_r1s_substring_rule_over_information_blocks() -> None:
    qa = task_for("nq")
    text = '<think> a </think>\n<search> q </search>\n\n<information>Doc 1(Title: "Paris") Paris is big.</information>\n\n<think> b </think>\n<answer> x </answer>'
    assert qa.score(text, ["paris"])["answer_in_docs"] == 1.0
    assert qa.score(text, ["Pari"])["answer_in_docs"] == 1.0  # substring, as in Search-R1
    assert qa.score(text, ["Berlin"])["answer_in_docs"] == 0.0
    # the answer is looked for in the policy's text only, the docs in the explicit list
    assert qa.score(text, ["x"], policy_text="no tags", docs=["x marks"])["answer"] is None
    assert qa.score(text, ["x"], docs=["x marks"])["answer_in_docs"] == 1.0


def test_unknown_data_source_uses_the_default_task_or_refuses() -> None:
    from sr1.errors import NotFoundError

    assert task_for("my-own-set").name == "qa"
    with pytest.raises(NotFoundError, match="scoring.default_task"):
        task_for("my-own-set", default="")
