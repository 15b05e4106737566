"""The evaluation methods (direct, cot, rag, search): how each builds prompts and uses the retriever.

- ``direct``: answer the question, one turn, no retrieval.
- ``cot``: reason, then answer, one turn, no retrieval.
- ``rag``: retrieve top-k passages for the question itself, put them in the prompt, one turn.
- ``search``: the Search-R1 loop; the model decides when and what to search (up to max_turns).
"""

from __future__ import annotations

from dataclasses import dataclass

from sr1.registry import Registry


@dataclass(frozen=True)
class EvalMethod:
    """How one method evaluates: the prompt kind it renders and how it uses retrieval."""

    name: str
    prompt: str  # the ``method`` argument of sr1.data.prompts.render_prompt
    retrieve_question: bool  # top-k passages for the question go into the prompt (rag)
    search_loop: bool  # the rollout loop may call the retriever (search)
    description: str

    @property
    def needs_retriever(self) -> bool:
        return self.retrieve_question or self.search_loop


METHODS: Registry[EvalMethod] = Registry("eval method")

for _m in (
    EvalMethod("direct", "direct", False, False, "answer directly, no retrieval"),
    EvalMethod("cot", "cot", False, False, "reason step by step, then answer; no retrieval"),
    EvalMethod("rag", "rag", True, False, "top-k passages for the question in the prompt"),
    EvalMethod("search", "search", False, True, "Search-R1 loop: the model issues searches"),
):
    METHODS.add(_m.name, _m)


def get_method(name: str) -> EvalMethod:
    """The method called ``name``; unknown names raise NotFoundError listing the valid ones."""
    return METHODS.get(name)
