"""Outcome rewards for RL, chosen by name (``algorithm.reward``), computed through sr1.scoring.

A reward reads the per-trajectory metrics that ``sr1.scoring.score`` produced over the text
the policy wrote (the rollout loop fills ``Trajectory.metrics``; information blocks and the
invalid-action notice are not part of it), so training rewards and eval numbers share one
code path. ``em`` is the default (Search-R1); ``f1`` is known to collapse (the policy learns
to stop answering); ``format`` is Search-R1's format-shaped EM:

=================================  ==================================================
answer correct, well-formed        1
answer correct, malformed          1 - format_score          (0.8)
answer wrong, well-formed          format_score (+ retrieval_score if a gold answer was
                                   in a retrieved block)     (0.2)
answer wrong, malformed            final_format_score        (0.1)
no answer                          0 (format_score if the response is otherwise well-formed)
=================================  ==================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sr1 import scoring
from sr1.config import AlgorithmConfig
from sr1.registry import Registry
from sr1.rollout.types import Trajectory

RewardFn = Callable[[dict[str, Any], AlgorithmConfig], float]
REWARDS: Registry[RewardFn] = Registry("reward")


@REWARDS.register("em")
def em_reward(m: dict[str, Any], cfg: AlgorithmConfig) -> float:
    """1 if the extracted answer exactly matches a gold answer (normalised), else 0."""
    return float(m.get("em", 0.0))


@REWARDS.register("f1")
def f1_reward(m: dict[str, Any], cfg: AlgorithmConfig) -> float:
    """Token F1 of the extracted answer against the best gold answer."""
    return float(m.get("f1", 0.0))


@REWARDS.register("format")
def format_reward(m: dict[str, Any], cfg: AlgorithmConfig) -> float:
    """Search-R1's format reward (table in the module docstring)."""
    correct = float(m.get("em", 0.0)) >= 1.0
    well_formed = float(m.get("well_formed", 0.0)) >= 1.0
    retrieved = float(m.get("answer_in_docs", 0.0)) >= 1.0
    bonus = cfg.retrieval_score if retrieved else 0.0
    if m.get("answer") is None and not m.get("has_answer", False):
        return cfg.format_score + bonus if well_formed else 0.0
    if correct:
        return 1.0 if well_formed else 1.0 - cfg.format_score
    if well_formed:
        return cfg.format_score + bonus
    return cfg.final_format_score


def trajectory_metrics(traj: Trajectory, policy_text: str | None = None) -> dict[str, Any]:
    """The scoring metrics of a trajectory: its stored ones, or computed via sr1.scoring from
    ``policy_text`` (the policy-written text; never the full text, which contains inserted
    blocks and the invalid-action notice)."""
    if traj.metrics and policy_text is None:
        m = dict(traj.metrics)
        m.setdefault("answer", traj.answer)
        m["has_answer"] = traj.answer is not None
        return m
    m = scoring.score(policy_text if policy_text is not None else traj.text, traj.golden_answers)
    m["has_answer"] = m["answer"] is not None
    return m


def make_reward_fn(cfg: AlgorithmConfig) -> Callable[[Trajectory], float]:
    """A ``Trajectory -> float`` reward for ``run_rollouts(reward_fn=...)``, by ``cfg.reward``."""
    fn = REWARDS.get(cfg.reward)

    def reward(traj: Trajectory) -> float:
        return fn(trajectory_metrics(traj), cfg)

    return reward
