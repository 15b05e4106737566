"""The one scoring path shared by training rewards and evaluation: answer extraction, EM, F1.

Normalisation is SQuAD-style (lowercase, drop punctuation, drop articles a/an/the, collapse
whitespace), as in Search-R1. Rewards (``sr1.algos.rewards``) call these functions, so a
reward and an eval number can never drift apart.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, articles and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _norm_unicode(s: str) -> str:
    return unicodedata.normalize("NFKC", s)


def extract_answer(response: str) -> str | None:
    """The content of the last ``<answer>…</answer>`` in the *response* (never the prompt,
    whose instructions contain an example answer). None when there is no complete answer."""
    found = _ANSWER_RE.findall(response)
    if not found:
        return None
    return found[-1].strip()


def exact_match(prediction: str | None, golden: Sequence[str]) -> float:
    if prediction is None:
        return 0.0
    p = normalize_answer(_norm_unicode(prediction))
    return float(any(p == normalize_answer(_norm_unicode(g)) for g in golden))


def cover_exact_match(prediction: str | None, golden: Sequence[str]) -> float:
    """1 if some normalised golden answer occurs as a token span in the normalised prediction."""
    if prediction is None:
        return 0.0
    p = f" {normalize_answer(_norm_unicode(prediction))} "
    return float(any(f" {normalize_answer(_norm_unicode(g))} " in p for g in golden if g.strip()))


def f1_score(prediction: str | None, golden: Sequence[str]) -> float:
    """Token-level F1 against the best-matching golden answer."""
    if prediction is None:
        return 0.0
    p_toks = normalize_answer(_norm_unicode(prediction)).split()
    best = 0.0
    for g in golden:
        g_toks = normalize_answer(_norm_unicode(g)).split()
        common = Counter(p_toks) & Counter(g_toks)
        same = sum(common.values())
        if same == 0:
            continue
        prec, rec = same / len(p_toks), same / len(g_toks)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


def answer_in_text(text: str, golden: Sequence[str]) -> float:
    """1 if a normalised golden answer appears in ``text`` (e.g. the retrieved passages)."""
    t = f" {normalize_answer(_norm_unicode(text))} "
    return float(
        any(f" {normalize_answer(_norm_unicode(g))} " in t for g in golden if normalize_answer(g))
    )


def is_well_formed(response: str) -> bool:
    """Search-R1 format check: balanced think/search/answer tags and exactly one final answer."""
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return False
    for tag in ("think", "search", "information"):
        if response.count(f"<{tag}>") != response.count(f"</{tag}>"):
            return False
    return response.rstrip().endswith("</answer>")


def score(response: str, golden: Sequence[str]) -> dict[str, float | str | None]:
    """All per-example metrics for one response: what eval stores and rewards read."""
    pred = extract_answer(response)
    return {
        "answer": pred,
        "em": exact_match(pred, golden),
        "cover_em": cover_exact_match(pred, golden),
        "f1": f1_score(pred, golden),
        "well_formed": float(is_well_formed(response)),
    }
