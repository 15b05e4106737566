"""Open-domain QA scoring: the one place a QA response becomes metrics and a reward.

Training rewards (``sr1.algos.rewards``) and eval rows (``sr1.eval.runner``) both call
:meth:`QATask.score`, so the number RL optimises and the number a table reports are computed
by the same lines. The primitives follow Search-R1 (``verl/utils/reward_score/qa_em*.py``) and
FlashRAG (``flashrag/evaluator/metrics.py``):

* ``normalize_answer``: SQuAD normalisation (lowercase, drop ASCII punctuation, drop the
  articles a/an/the, collapse whitespace). ``nfkc=True`` first folds full-width letters and
  ligatures (``ＰＡＲＩＳ``, ``ﬁ``); it is **off by default** for exact Search-R1/FlashRAG parity
  (``scoring.nfkc``).
* ``em``: normalised equality with any gold answer (Search-R1 ``em_check``).
* ``cover_em``: a normalised gold answer is a substring of the normalised prediction
  (Search-R1 ``subem_check``, FlashRAG ``Sub_ExactMatch``/acc); empty gold answers never match.
* ``f1``: SQuAD token F1, max over gold answers, with FlashRAG's rule that ``yes``, ``no`` and
  ``noanswer`` score 0 unless prediction and gold are the same one of them.
* ``well_formed``: Search-R1's ``is_valid_sequence`` over the whole response (information
  blocks included): every tag balanced, ``<think>`` first and again after every
  ``</information>``, ``<search>`` or ``<answer>`` only right after ``</think>``, nothing but
  whitespace outside the tags, ending at ``</answer>``. A forced answer (the environment
  inserted ``<answer>``) is never well-formed.
* ``answer_in_docs``: Search-R1's ``is_retrieval_correct``: a normalised gold answer is a
  substring of a normalised ``<information>`` block (or of the passages a ``rag`` prompt
  showed). None when nothing was retrieved.
* The ``format`` reward is Search-R1's ``qa_em_format.compute_score_em`` table (see
  :func:`format_reward`); ``em`` and ``f1`` rewards are those metrics.

Deliberate differences from Search-R1, all here:

1. The answer is the last ``<answer>…</answer>`` of the *response*. Search-R1 scores
   prompt+response and needs two matches, because its prompt holds an example answer; sr1
   never scores the prompt, so one match is enough: the same answer either way.
2. Only what the policy wrote is searched for the answer (information blocks and the
   invalid-action notice, which contains "<answer> and </answer>", are not), while the format
   check reads the whole response, as Search-R1's does.
3. Special tokens (``<|im_end|>``, pads) are removed before the format check: Search-R1 never
   has them after ``</answer>`` because it cuts the decoded text there.
4. ``answer_fallback=response`` (eval only, off by default) scores the first line of an
   untagged response, as FlashRAG scores its untagged baselines; Search-R1 gives those 0.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INFO_RE = re.compile(r"<information>(.*?)</information>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)
_TAGS = ("think", "search", "information", "answer")
_TAG_SPLIT = re.compile(r"(</?(?:think|search|information|answer)>)")
_YES_NO = ("yes", "no", "noanswer")
FALLBACKS = ("none", "response")


def normalize_answer(s: str, nfkc: bool = False) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, articles and extra whitespace
    (NFKC-folded first when ``nfkc``)."""
    if nfkc:
        s = unicodedata.normalize("NFKC", s)
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def extract_answer(response: str) -> str | None:
    """The content of the last ``<answer>…</answer>`` in the *response* (never the prompt,
    whose instructions contain an example answer). None when there is no complete answer."""
    found = _ANSWER_RE.findall(response)
    if not found:
        return None
    return found[-1].strip()


def fallback_answer(response: str, special_tokens: Sequence[str] = ()) -> str | None:
    """The first non-empty line of an untagged response, special tokens and a leading
    "answer:" removed: what ``eval.answer_fallback=response`` scores. None if nothing is left."""
    for tok in special_tokens:
        if tok:
            response = response.replace(tok, " ")
    for line in response.splitlines():
        line = re.sub(r"^\s*(the\s+)?(final\s+)?answer\b\s*(is)?\s*[:：]?\s*", "", line, flags=re.I)
        if line.strip():
            return line.strip()
    return None


def exact_match(prediction: str | None, golden: Sequence[str], nfkc: bool = False) -> float:
    """1 if the normalised prediction equals a normalised gold answer."""
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction, nfkc)
    return float(any(p == normalize_answer(g, nfkc) for g in golden))


def cover_exact_match(prediction: str | None, golden: Sequence[str], nfkc: bool = False) -> float:
    """1 if a (non-empty) normalised gold answer is a substring of the normalised prediction."""
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction, nfkc)
    return float(any(g and g in p for g in (normalize_answer(x, nfkc) for x in golden)))


def f1_score(prediction: str | None, golden: Sequence[str], nfkc: bool = False) -> float:
    """Token-level F1 against the best-matching gold answer (FlashRAG's yes/no/noanswer rule)."""
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction, nfkc)
    p_toks = p.split()
    best = 0.0
    for g in golden:
        gn = normalize_answer(g, nfkc)
        if (p in _YES_NO or gn in _YES_NO) and p != gn:
            continue
        g_toks = gn.split()
        same = sum((Counter(p_toks) & Counter(g_toks)).values())
        if same == 0:
            continue
        prec, rec = same / len(p_toks), same / len(g_toks)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


def answer_in_text(text: str, golden: Sequence[str], nfkc: bool = False) -> float:
    """1 if a normalised gold answer occurs as whole tokens in ``text``: the stricter rule
    retrieval-quality reports use (``sr1.retrieval.quality``); rewards use Search-R1's
    substring rule, :func:`answer_in_docs`."""
    t = f" {normalize_answer(text, nfkc)} "
    return float(any(f" {g} " in t for g in (normalize_answer(x, nfkc) for x in golden) if g))


def answer_in_docs(docs: Sequence[str], golden: Sequence[str], nfkc: bool = False) -> float:
    """Search-R1's ``is_retrieval_correct``: a normalised gold answer is a substring of some
    normalised retrieved block."""
    golds = [g for g in (normalize_answer(x, nfkc) for x in golden) if g]
    for d in docs:
        dn = normalize_answer(d, nfkc)
        if any(g in dn for g in golds):
            return 1.0
    return 0.0


def information_blocks(response: str) -> list[str]:
    """The stripped contents of the ``<information>`` blocks of a response."""
    return [b.strip() for b in _INFO_RE.findall(response)]


def is_valid_sequence(response: str) -> bool:
    """Search-R1's format check (``is_valid_sequence``) on the response text: balanced tags,
    think -> (search -> information -> think)* -> answer, only whitespace between tags."""
    for tag in _TAGS:
        if response.count(f"<{tag}>") != response.count(f"</{tag}>"):
            return False
    moves = {
        ("<think>", "start"): "in_think",
        ("<think>", "information"): "in_think",
        ("</think>", "in_think"): "after_think",
        ("<search>", "after_think"): "in_search",
        ("</search>", "in_search"): "after_search",
        ("<information>", "after_search"): "in_information",
        ("</information>", "in_information"): "information",
        ("<answer>", "after_think"): "in_answer",
        ("</answer>", "in_answer"): "end",
    }
    state = "start"
    for part in _TAG_SPLIT.split(response):
        if not part.strip():
            continue
        if _TAG_SPLIT.fullmatch(part):
            nxt = moves.get((part, state))
            if nxt is None:
                return False
            state = nxt
        elif not state.startswith("in_"):
            return False  # text outside the tags (or after </answer>)
    return state == "end"


@dataclass(frozen=True)
class ScoreOptions:
    """How a response is scored (``scoring.*`` and ``eval.answer_fallback`` in the config)."""

    nfkc: bool = False
    answer_fallback: str = "none"
    special_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.answer_fallback not in FALLBACKS:
            from sr1.errors import ConfigError

            raise ConfigError(
                f"unknown answer fallback {self.answer_fallback!r}; valid: {', '.join(FALLBACKS)}"
            )


class QATask:
    """Exact-match QA (the seven benchmarks and the synthetic world)."""

    name = "qa"

    def score(
        self,
        response: str,
        golden: Sequence[str],
        *,
        policy_text: str | None = None,
        forced: bool = False,
        docs: Sequence[str] | None = None,
        opts: ScoreOptions = ScoreOptions(),
    ) -> dict[str, Any]:
        """All metrics of one response.

        ``response`` is the whole response text (inserted blocks included); ``policy_text``
        the part the policy wrote, where the answer is looked for (default: ``response``);
        ``forced``: the environment opened the answer; ``docs``: the retrieved texts (default:
        the response's information blocks; ``[]`` = nothing retrieved).
        """
        policy = response if policy_text is None else policy_text
        pred = extract_answer(policy)
        source = "tag" if pred is not None else "none"
        if pred is None and opts.answer_fallback == "response":
            pred = fallback_answer(policy, opts.special_tokens)
            source = "fallback" if pred else "none"
        clean = response
        for tok in opts.special_tokens:
            if tok:
                clean = clean.replace(tok, "")
        blocks = information_blocks(response) if docs is None else list(docs)
        return {
            "answer": pred,
            "answer_source": source,
            "em": exact_match(pred, golden, opts.nfkc),
            "cover_em": cover_exact_match(pred, golden, opts.nfkc),
            "f1": f1_score(pred, golden, opts.nfkc),
            "well_formed": float(is_valid_sequence(clean) and not forced),
            "forced_answer": float(forced),
            "answer_in_docs": answer_in_docs(blocks, golden, opts.nfkc) if blocks else None,
        }


def format_reward(
    m: dict[str, Any], format_score: float, final_format_score: float, retrieval_score: float
) -> float:
    """Search-R1's ``qa_em_format`` reward from a :meth:`QATask.score` dict.

    ==========================  ====================================================
    no answer, well-formed      format_score (+ retrieval_score if a gold was retrieved)
    no answer, malformed        0
    correct, well-formed        1
    correct, malformed          1 - format_score
    wrong, well-formed          format_score (+ retrieval_score if a gold was retrieved)
    wrong, malformed            final_format_score
    ==========================  ====================================================
    """
    well_formed = float(m.get("well_formed") or 0.0) >= 1.0
    retrieved = float(m.get("answer_in_docs") or 0.0) >= 1.0
    shaped = format_score + (retrieval_score if retrieved else 0.0)
    if m.get("answer") is None:
        return shaped if well_formed else 0.0
    if float(m.get("em") or 0.0) >= 1.0:
        return 1.0 if well_formed else 1.0 - format_score
    return shaped if well_formed else final_format_score
