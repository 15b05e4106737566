"""Prompts: the paper's text verbatim, the question rule, the chat wrapping, the baselines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sr1.data.prompts import METHODS, SEARCH_R1_TEMPLATE, TEMPLATES, render_prompt
from sr1.errors import NotFoundError, Sr1Error
from sr1.models import qwen_tokenizer_dir
from sr1.retrieval.base import Passage, format_passages

# Typed out from the paper's base prompt (Search-R1 v5 / its data script), typo included.
PAPER_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {question}\n"
)


@pytest.fixture(scope="module")
def qwen_tok():
    """The real Qwen2.5 tokenizer (with its chat template)."""
    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))


def test_search_prompt_is_the_papers_text() -> None:
    assert SEARCH_R1_TEMPLATE == PAPER_PROMPT
    q = "who played bat masterson in the movie tombstone"
    assert render_prompt(q) == PAPER_PROMPT.format(question=q + "?")
    assert render_prompt(q).endswith("Question: who played bat masterson in the movie tombstone?\n")


def test_search_prompt_matches_method_md() -> None:
    """The prompt quoted in ../shared/method.md, re-joined from its wrapped lines."""
    md = Path(__file__).resolve().parents[2].parent / "shared" / "method.md"
    if not md.is_file():
        pytest.skip("../shared/method.md is absent")
    m = re.search(r'"(Answer the given question\..*?)\\n"', md.read_text(), re.S)
    assert m, "base prompt not found in method.md"
    quoted = " ".join(m.group(1).split()).replace("{q}", "{question}") + "\n"
    assert quoted == SEARCH_R1_TEMPLATE


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  where is Zorvia  ", "where is Zorvia?"),
        ("Who founded Qelm?", "Who founded Qelm?"),
        ("Who founded Qelm? ", "Who founded Qelm?"),
        ("\twhat\n", "what?"),
    ],
)
def test_question_stripped_and_question_mark_added(raw: str, expected: str) -> None:
    assert render_prompt(raw).endswith(f"Question: {expected}\n")
    assert render_prompt(raw).count("Question:") == 1


def test_empty_question_is_an_error() -> None:
    with pytest.raises(Sr1Error, match="empty question"):
        render_prompt("   ")


def test_instruct_wraps_in_the_chat_template(qwen_tok) -> None:
    text = render_prompt("Who founded Qelm", template="base")
    wrapped = render_prompt("Who founded Qelm", template="instruct", tokenizer=qwen_tok)
    assert wrapped == qwen_tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\n" + text in wrapped
    assert wrapped.endswith("<|im_start|>assistant\n")
    assert render_prompt("Who founded Qelm", template="auto", tokenizer=qwen_tok) == wrapped


def test_auto_falls_back_to_raw_without_chat_template() -> None:
    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))
    tok.chat_template = None
    raw = render_prompt("x", template="base")
    assert render_prompt("x", template="auto", tokenizer=tok) == raw
    assert render_prompt("x", template="auto", tokenizer=None) == raw
    with pytest.raises(Sr1Error, match="chat template"):
        render_prompt("x", template="instruct", tokenizer=tok)
    with pytest.raises(Sr1Error, match="chat template"):
        render_prompt("x", template="instruct")


def test_baseline_methods() -> None:
    assert set(METHODS.names()) == {"search", "direct", "cot", "rag", "search_short"}
    assert set(TEMPLATES.names()) == {"base", "instruct", "auto"}
    for m in ("direct", "cot"):
        p = render_prompt("who wrote it", method=m)
        assert p.endswith("Question: who wrote it?\n")
        assert "<answer>" in p and "<search>" not in p
    ps = [
        Passage("1", '"Qelm"\nQelm was founded by Anra Voss.'),
        Passage("2", '"Zorvia"\nZorvia lies on the Dast.'),
    ]
    rag = render_prompt("who founded qelm", method="rag", passages=ps)
    assert format_passages(ps) in rag
    # Search-R1's text: the corpus title line as stored (wiki-18 quotes it)
    assert 'Doc 1(Title: "Qelm") Qelm was founded by Anra Voss.\nDoc 2(Title: "Zorvia")' in rag
    assert rag.index("Doc 1") < rag.index("Question: who founded qelm?")
    with pytest.raises(Sr1Error, match="needs the retrieved passages"):
        render_prompt("q", method="rag")


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(NotFoundError, match="valid: cot, direct, rag, search, search_short"):
        render_prompt("q", method="ircot")
    with pytest.raises(NotFoundError, match="valid: auto, base, instruct"):
        render_prompt("q", template="chatml")


def test_search_short_keeps_the_protocol_in_fewer_tokens(qwen_tok) -> None:
    short = render_prompt(" who founded Qelm ", method="search_short")
    full = render_prompt(" who founded Qelm ")
    for tag in ("<think>", "</think>", "<search>", "</search>", "<information>", "</answer>"):
        assert tag in short
    assert short.endswith("Question: who founded Qelm?\n") and short != full
    n_short, n_full = (len(qwen_tok(p)["input_ids"]) for p in (short, full))
    assert n_short * 2 < n_full, (n_short, n_full)
    wrapped = render_prompt("who founded Qelm", "search_short", "instruct", tokenizer=qwen_tok)
    assert "<|im_start|>user\n" + short in wrapped
