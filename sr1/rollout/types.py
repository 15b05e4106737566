"""The trajectory record every stage exchanges (rollout -> reward -> trainer / eval / JSONL)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Trajectory:
    """One prompt's response, built token by token with its loss mask.

    ``response_ids``, ``loss_mask`` and ``logprobs`` always have the same length.
    ``loss_mask[t] == 1`` iff token t was sampled by the policy; 0 for every token the
    environment inserted (information blocks, invalid-action notices, forced suffixes).
    ``logprobs[t]`` is the engine's log-prob of a sampled token (0.0 where mask is 0).
    """

    id: str
    question: str
    golden_answers: list[str]
    data_source: str
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # decoded response (prompt excluded)
    num_searches: int = 0
    queries: list[str] = field(default_factory=list)
    retrieved_ids: list[list[str]] = field(default_factory=list)
    answer: str | None = None
    reward: float = 0.0
    metrics: dict[str, Any] = field(
        default_factory=dict
    )  # em, f1, cover_em, well_formed, answer_in_docs
    finish_reason: str = ""  # answer | eos | forced | max_turns | length | context
    # [kind, start, end) spans of response_ids in order; kind: gen (sampled, mask 1), obs
    # (information block), notice (invalid-action notice), force (forced-answer suffix)
    segments: list[tuple[str, int, int]] = field(default_factory=list)
    gen_time_s: float = 0.0
    retrieval_time_s: float = 0.0
    group: int = 0  # index of the prompt within the batch (GRPO/RLOO groups)
    # the policy version (RL steps whose update the engine had loaded) that sampled the
    # response: the engine's ``version`` when its turns were generated
    policy_version: int = 0
    hops: int = 0  # the question's hop count where the data records it (0: unknown)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
