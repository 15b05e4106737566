"""Tasks: how a finished trajectory is scored, picked by the row's ``data_source``.

``task_for(data_source)`` returns the :class:`~sr1.tasks.qa.QATask`-like scorer for a data
source: the registered table first (the seven benchmarks and ``synth`` are QA), then the
configured default task (``scoring.default_task``, ``qa``) for data sources sr1 does not know
(a user's own JSONL), or a loud error when the default is ``""``. ``score_trajectory`` is what
the rollout loop, training rewards and eval call: one path from trajectory to metrics.
A new task is one module with a ``score`` method plus a ``TASKS`` entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sr1.data.datasets import DATASETS
from sr1.errors import NotFoundError
from sr1.registry import Registry
from sr1.tasks.qa import QATask, ScoreOptions


class Task(Protocol):
    name: str

    def score(
        self,
        response: str,
        golden: Sequence[str],
        *,
        policy_text: str | None = None,
        forced: bool = False,
        docs: Sequence[str] | None = None,
        opts: ScoreOptions = ...,
    ) -> dict[str, Any]: ...


TASKS: Registry[Task] = Registry("task")
TASKS.add("qa", QATask())

# data_source -> task name: every registered dataset (the seven benchmarks, synth) is QA
DATA_SOURCES: dict[str, str] = {name: "qa" for name in DATASETS.names()}


def task_for(data_source: str, default: str = "qa") -> Task:
    """The task scoring rows of ``data_source`` (``default`` for unlisted sources)."""
    name = DATA_SOURCES.get(data_source) or default
    if not name:
        raise NotFoundError(
            f"no task is registered for data_source {data_source!r}; known: "
            f"{', '.join(sorted(DATA_SOURCES))}",
            hint="set scoring.default_task=qa to score it as open-domain QA",
        )
    return TASKS.get(name)


__all__ = ["DATA_SOURCES", "TASKS", "ScoreOptions", "Task", "task_for"]
