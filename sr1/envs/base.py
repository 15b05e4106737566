"""The environment interface the rollout loop drives: parse an action, execute a batch, render.

An :class:`Env` is a tool the policy calls by writing ``<tag> content </tag>``. The loop
(``sr1.rollout.loop``) stays tool-agnostic: it generates until one of ``Env.stops`` (the
tool's closing tag or ``</answer>``), asks ``parse`` for the action, runs every action of a
turn through one batched ``execute``, and appends ``observation_ids`` with mask 0 through the
same append that gives sampled tokens mask 1. A turn with neither a valid action nor an answer
gets ``invalid_notice``. A new tool is one module with an Env subclass plus an ``ENVS``
registry entry (``sr1.envs``); :mod:`sr1.envs.calculator` is the worked example.

Observation text follows Search-R1's ``execute_predictions``: ``\\n\\n<open>BODY</close>\\n\\n``
with ``BODY = render(obs).strip()``, so an empty result reads ``<open></close>``. The body is
cut to ``max_obs_length`` tokens, while both tags are always kept (Search-R1 cuts the whole
string, closing tag included: see ``observation_ids``). When the policy's last token already
carried newlines (Qwen2.5 samples ``>ĊĊ``), the leading ``\\n\\n`` is shortened by them, so the
text reads the same however the tokens fell.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

INVALID_NOTICE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)
ANSWER_STOP = "</answer>"


@dataclass(frozen=True)
class Action:
    """A tool call parsed from one policy turn."""

    tool: str
    content: str


@dataclass
class Observation:
    """What a tool returned for one action: ``text`` is the body shown between the tags;
    ``docs`` the texts an answer-in-docs check reads; ``info`` tool-specific records."""

    text: str
    docs: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Env(ABC):
    """A tool environment. Subclasses set ``name``, ``tag`` and the observation tags and
    implement ``execute``; ``parse`` and ``observation_ids`` are shared."""

    name: ClassVar[str]
    tag: ClassVar[str]  # the action tag: <tag> content </tag>
    obs_open: ClassVar[str] = "<information>"
    obs_close: ClassVar[str] = "</information>"
    invalid_notice: ClassVar[str] = INVALID_NOTICE

    @property
    def stop(self) -> str:
        """The string that ends a tool-call turn."""
        return f"</{self.tag}>"

    @property
    def stops(self) -> list[str]:
        """Stop strings for a turn that may call the tool or answer."""
        return [self.stop, ANSWER_STOP]

    def parse(self, turn_text: str) -> Action | None:
        """The action between the last ``</tag>`` of this turn and the ``<tag>`` before it
        (stripped); None when there is no such pair or it is empty (an invalid action)."""
        end = turn_text.rfind(self.stop)
        start = turn_text.rfind(f"<{self.tag}>", 0, max(end, 0))
        if end < 0 or start < 0:
            return None
        content = turn_text[start + len(self.tag) + 2 : end].strip()
        return Action(self.tag, content) if content else None

    @abstractmethod
    def execute(self, actions: Sequence[Action]) -> list[Observation]:
        """One observation per action, in order: the whole turn in one batched call."""

    def observation_ids(
        self, tokenizer: Any, obs: Observation, max_obs_length: int, after: str
    ) -> list[int]:
        """Token ids inserted after the policy text ``after`` (see the module docstring)."""
        newlines = len(after) - len(after.rstrip("\n"))
        lead = "\n" * max(0, 2 - newlines) + self.obs_open
        body = encode(tokenizer, obs.text.strip())[:max_obs_length]
        return encode(tokenizer, lead) + body + encode(tokenizer, self.obs_close + "\n\n")

    def describe(self) -> dict[str, Any]:
        """What identifies this environment for reproducibility."""
        return {"env": self.name}
