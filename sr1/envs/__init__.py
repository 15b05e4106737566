"""Tool environments for the rollout loop, by name (``rollout.env``).

``make_env(name, retriever=..., cfg=...)`` builds one; ``search`` (Search-R1's retriever tool)
is the default, ``calculator`` a second, self-contained tool. See :mod:`sr1.envs.base`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sr1.envs.base import ANSWER_STOP, INVALID_NOTICE, Action, Env, Observation
from sr1.envs.calculator import CalculatorEnv
from sr1.envs.search import SearchEnv
from sr1.errors import ConfigError
from sr1.registry import Registry

EnvFactory = Callable[..., Env]
ENVS: Registry[EnvFactory] = Registry("environment")


@ENVS.register("search")
def _search(retriever: Any = None, topk: int = 3, **_: Any) -> Env:
    if retriever is None:
        raise ConfigError("the search environment needs a retriever (retrieval.index)")
    return SearchEnv(retriever, topk=topk)


@ENVS.register("calculator")
def _calculator(**_: Any) -> Env:
    return CalculatorEnv()


def make_env(name: str, retriever: Any = None, topk: int = 3) -> Env:
    """The environment registered as ``name`` (loud error listing the valid names)."""
    return ENVS.get(name)(retriever=retriever, topk=topk)


__all__ = [
    "ANSWER_STOP",
    "ENVS",
    "INVALID_NOTICE",
    "Action",
    "CalculatorEnv",
    "Env",
    "Observation",
    "SearchEnv",
    "make_env",
]
