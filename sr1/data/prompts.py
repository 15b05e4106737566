"""Prompt rendering: the Search-R1 prompt, the baselines' prompts, and how each is wrapped.

Two named registries, both recorded with every run:

* ``METHODS`` — what the prompt asks for: ``search`` (the paper's base prompt, verbatim),
  ``direct`` (answer at once), ``cot`` (reason, then answer: the paper's R1-without-search
  prompt), ``rag`` (the top-k passages for the question, then the question), and
  ``search_short``.
* ``TEMPLATES`` — how the text reaches the model: ``base`` (raw text, as Search-R1's data
  script writes it), ``instruct`` (one user turn in the tokenizer's chat template, generation
  prompt added; an error if the tokenizer has none), ``auto`` (the chat template when the
  tokenizer has one, else raw). ``auto`` mirrors Search-R1's trainer, which wraps the prompt in
  the chat template whenever one exists, even for base models; ``base`` reproduces the prompt
  text exactly as the paper prints it.

Deliberate departure from the paper: ``search_short`` is a compact search prompt with the same
tags and rules (reason in ``<think>``, query in ``<search>``, results in ``<information>``,
answer in ``<answer>``) in under half the tokens: 47 vs 121 Qwen2.5 tokens for a short
question. The CPU quickstart uses it because SmolLM2-135M trains at ~150 tokens/s on 2 cores
and the paper's ~100-token preamble would be most of every sequence. It is not the paper's
prompt: the method name is recorded with every run, so results that used it are never
compared as if they had used ``search``.

Every method asks for the answer inside ``<answer> … </answer>`` so one scorer
(:mod:`sr1.tasks`) serves them all. The question is stripped and gets ``?`` appended when
missing, as Search-R1's data script does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sr1.errors import Sr1Error
from sr1.registry import Registry
from sr1.retrieval.base import Passage, format_passages

# The paper's base prompt, character for character (including "as your want").
SEARCH_R1_TEMPLATE = (
    "Answer the given question. "
    "You must conduct reasoning inside <think> and </think> first every time you get new "
    "information. "
    "After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between "
    "<information> and </information>. "
    "You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer "
    "inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n"
)

# Search-R1's "R1" baseline (RL without search): reason in <think>, answer in <answer>.
COT_TEMPLATE = (
    "Answer the given question. "
    "You should first have a reasoning process in mind and then provides the answer. "
    "Show your reasoning in <think> </think> tags and return the final answer in "
    "<answer> </answer> tags, for example <answer> Beijing </answer>. Question: {question}\n"
)

DIRECT_TEMPLATE = (
    "Answer the given question directly, without reasoning or explanation. "
    "Provide only the answer inside <answer> and </answer>, "
    "for example <answer> Beijing </answer>. Question: {question}\n"
)

# Not the paper's prompt (see the module docstring): the same protocol in far fewer tokens.
SEARCH_SHORT_TEMPLATE = (
    "Reason in <think> </think>. Search with <search> query </search>; results appear in "
    "<information> </information>. Give a short final answer in <answer> </answer>. "
    "Question: {question}\n"
)

RAG_TEMPLATE = (
    "Answer the given question using the documents below if they help. "
    "Provide only the answer inside <answer> and </answer>, without detailed illustrations, "
    "for example <answer> Beijing </answer>.\n"
    "Documents:\n{documents}Question: {question}\n"
)


@dataclass(frozen=True)
class PromptMethod:
    """One prompt kind: its text (``{question}``, and ``{documents}`` when it needs passages)."""

    name: str
    text: str
    needs_passages: bool
    description: str

    def render(self, question: str, passages: Sequence[Passage] | None = None) -> str:
        if not self.needs_passages:
            return self.text.format(question=question)
        if passages is None:
            raise Sr1Error(
                f"prompt method {self.name!r} needs the retrieved passages",
                hint="pass passages=retriever.search([question], k)[0]",
            )
        return self.text.format(question=question, documents=format_passages(passages))


METHODS: Registry[PromptMethod] = Registry("prompt method")
for _m in (
    PromptMethod("search", SEARCH_R1_TEMPLATE, False, "Search-R1 base prompt (the paper's text)"),
    PromptMethod("direct", DIRECT_TEMPLATE, False, "answer directly, no reasoning, no retrieval"),
    PromptMethod("cot", COT_TEMPLATE, False, "reason in <think>, then answer (R1 w/o search)"),
    PromptMethod("rag", RAG_TEMPLATE, True, "top-k passages for the question, then answer"),
    PromptMethod(
        "search_short",
        SEARCH_SHORT_TEMPLATE,
        False,
        "compact search prompt for tiny CPU models (not the paper's text)",
    ),
):
    METHODS.add(_m.name, _m)


def _has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _wrap_chat(text: str, tokenizer: Any) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def _template_base(text: str, tokenizer: Any) -> str:
    return text


def _template_instruct(text: str, tokenizer: Any) -> str:
    if not _has_chat_template(tokenizer):
        raise Sr1Error(
            "prompt template 'instruct' needs a tokenizer with a chat template",
            hint="pass the model's tokenizer, or use template 'base' (raw) or 'auto'",
        )
    return _wrap_chat(text, tokenizer)


def _template_auto(text: str, tokenizer: Any) -> str:
    return _wrap_chat(text, tokenizer) if _has_chat_template(tokenizer) else text


TEMPLATES: Registry[Callable[[str, Any], str]] = Registry("prompt template")
TEMPLATES.add("base", _template_base)
TEMPLATES.add("instruct", _template_instruct)
TEMPLATES.add("auto", _template_auto)


def normalize_question(question: str) -> str:
    """Strip the question and append ``?`` when missing (Search-R1's data script)."""
    q = str(question).strip()
    if not q:
        raise Sr1Error("cannot render a prompt for an empty question")
    return q if q.endswith("?") else q + "?"


def render_prompt(
    question: str,
    method: str = "search",
    template: str = "base",
    tokenizer: Any = None,
    passages: list[Passage] | None = None,
) -> str:
    """The prompt text for ``question``: ``METHODS[method]`` wrapped by ``TEMPLATES[template]``.

    ``passages`` (the top-k for the question) are required by ``rag`` and ignored otherwise.
    Unknown method or template names raise NotFoundError listing the valid ones.
    """
    wrap = TEMPLATES.get(template)
    text = METHODS.get(method).render(normalize_question(question), passages)
    return wrap(text, tokenizer)
