"""Rewards: chosen by name, over the task scorer's metrics (sr1.tasks), Search-R1's format table."""

from __future__ import annotations

import pytest

from sr1.algos.rewards import REWARDS, format_reward, make_reward_fn, trajectory_metrics
from sr1.config import AlgorithmConfig
from sr1.errors import NotFoundError
from sr1.rollout.types import Trajectory
from sr1.tasks import task_for

WF_RIGHT = (
    "<think> x </think>\n<search> q </search>\n\n<information>Doc 1(Title: Lyon) Lyon"
    "</information>\n\n<think> y </think>\n<answer> Paris </answer>"
)
WF_WRONG = "<think> x </think>\n<answer> Lyon </answer>"
MAL_RIGHT = "<think> x \n<answer> Paris </answer>"  # unclosed think
MAL_WRONG = "<think> x \n<answer> Lyon </answer>"
NO_ANSWER = "<think> x </think>\n<search> q </search>"


def _traj(policy_text: str, answer_in_docs: float = 0.0) -> Trajectory:
    m = task_for("t").score(policy_text, ["Paris", "City of Paris"])
    answer = m.pop("answer")
    m["answer_in_docs"] = answer_in_docs
    return Trajectory(
        id="1", question="q", golden_answers=["Paris", "City of Paris"], data_source="t",
        prompt="p", prompt_ids=[1], text=policy_text, answer=answer, metrics=m,
    )  # fmt: skip


@pytest.mark.parametrize(
    "text,want",
    [(WF_RIGHT, 1.0), (MAL_RIGHT, 0.8), (WF_WRONG, 0.2), (MAL_WRONG, 0.1), (NO_ANSWER, 0.0)],
)
def test_format_reward_table(text, want):
    cfg = AlgorithmConfig(reward="format")
    assert make_reward_fn(cfg)(_traj(text)) == pytest.approx(want)


def test_format_reward_retrieval_credit():
    cfg = AlgorithmConfig(reward="format", retrieval_score=0.1)
    assert make_reward_fn(cfg)(_traj(WF_WRONG, answer_in_docs=1.0)) == pytest.approx(0.3)
    assert make_reward_fn(cfg)(_traj(MAL_WRONG, answer_in_docs=1.0)) == pytest.approx(0.1)


def test_em_is_default_and_f1_differs():
    assert AlgorithmConfig().reward == "em"
    t = _traj("<answer> the city of paris! </answer>")
    assert make_reward_fn(AlgorithmConfig())(t) == 1.0  # SQuAD normalisation
    partial = _traj("<answer> Paris France </answer>")
    assert make_reward_fn(AlgorithmConfig())(partial) == 0.0
    assert make_reward_fn(AlgorithmConfig(reward="f1"))(partial) == pytest.approx(2 / 3)


def test_metrics_recomputed_from_policy_text_only():
    # the invalid-action notice contains "<answer> and </answer>": scoring the full text would
    # extract "and"; the reward must score only what the policy wrote
    t = _traj(NO_ANSWER)
    t.metrics = {}
    t.text = NO_ANSWER + "\nput the answer between <answer> and </answer>."
    m = trajectory_metrics(t, policy_text=NO_ANSWER)
    assert m["answer"] is None and format_reward(m, AlgorithmConfig()) == 0.0


def test_unknown_reward_lists_valid():
    with pytest.raises(NotFoundError, match="em, f1, format"):
        make_reward_fn(AlgorithmConfig(reward="bleu"))
    assert REWARDS.names() == ["em", "f1", "format"]
