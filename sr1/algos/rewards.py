"""Outcome rewards for RL, chosen by name (``algorithm.reward``), over the task's metrics.

A reward reads the per-trajectory metrics that the row's task (``sr1.tasks``, picked by
``data_source``) computed when the rollout finished, so training rewards and eval numbers come
from one scorer. ``em`` is the default (Search-R1); ``f1`` is known to collapse (the policy
learns to stop answering); ``format`` is Search-R1's format-shaped EM
(:func:`sr1.tasks.qa.format_reward` has the table).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sr1.config import AlgorithmConfig
from sr1.registry import Registry
from sr1.rollout.types import Trajectory
from sr1.tasks import ScoreOptions, task_for
from sr1.tasks.qa import format_reward as _format_table

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
    """Search-R1's format reward (``qa_em_format``), weights from the algorithm config."""
    return _format_table(m, cfg.format_score, cfg.final_format_score, cfg.retrieval_score)


def trajectory_metrics(
    traj: Trajectory, policy_text: str | None = None, opts: ScoreOptions | None = None
) -> dict[str, Any]:
    """The scoring metrics of a trajectory: its stored ones, or the task's score of its text
    with the answer looked for in ``policy_text`` (the policy-written part; never the
    inserted blocks or the invalid-action notice)."""
    if traj.metrics and policy_text is None:
        m = dict(traj.metrics)
        m.setdefault("answer", traj.answer)
        return m
    return task_for(traj.data_source).score(
        traj.text,
        traj.golden_answers,
        policy_text=policy_text,
        opts=opts if opts is not None else ScoreOptions(),
    )


def make_reward_fn(cfg: AlgorithmConfig) -> Callable[[Trajectory], float]:
    """A ``Trajectory -> float`` reward for ``run_rollouts(reward_fn=...)``, by ``cfg.reward``."""
    fn = REWARDS.get(cfg.reward)

    def reward(traj: Trajectory) -> float:
        return fn(trajectory_metrics(traj), cfg)

    return reward
