"""MLflow logging through an explicit client (no global fluent state).

Default store: a local sqlite file ``sqlite:///$SR1_HOME/mlflow.db`` with artifacts under
``$SR1_HOME/mlartifacts``; ``MLFLOW_TRACKING_URI`` (or ``tracking.mlflow_uri``) points it at a server.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from sr1 import paths
from sr1.locks import file_lock


def tracking_uri(override: str | None = None) -> str:
    return (
        override or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db_path()}"
    )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; what MLflow params need."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowLogger:
    """One MLflow run. All calls are best-effort safe to repeat; values are stringified for params."""

    def __init__(
        self,
        experiment: str,
        uri: str | None = None,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.uri = tracking_uri(uri)
        # MLflow creates (or checks) the sqlite schema when the client opens the store, and the
        # experiment on first use; two processes doing that at once on a fresh home collide
        # ("table experiments already exists", a unique-name violation), so a local sqlite store
        # is set up under a file lock. A server does its own locking.
        lock = (
            file_lock(paths.home() / "mlflow.db.lock", what="MLflow's sqlite store set-up")
            if self.uri.startswith("sqlite:")
            else contextlib.nullcontext()
        )
        with lock:
            self.client, self.experiment_id = self._open(experiment)
        exp_id = self.experiment_id
        if run_id is None:
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags or {})
            self.run_id = run.info.run_id
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def _open(self, experiment: str) -> tuple[Any, str]:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            return client, exp.experiment_id
        artifact_root = None
        if self.uri.startswith("sqlite:"):
            artifact_root = (paths.home() / "mlartifacts").as_uri()
        try:
            return client, client.create_experiment(experiment, artifact_location=artifact_root)
        except MlflowException:
            # another process created it between the lookup and here (a tracking server)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            return client, exp.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k[:250], str(v)[:6000]) for k, v in flat.items() if k[:250] not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(
        self, step: int, metrics: dict[str, float], timestamp_ms: int | None = None
    ) -> None:
        import time

        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        self.log_points([(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None])

    def log_points(self, points: list[tuple[str, float, int, int]]) -> None:
        """Log ``(key, value, timestamp_ms, step)`` points, 500 per request."""
        from mlflow.entities import Metric

        items = [Metric(k, float(v), int(ts), int(st)) for k, v, ts, st in points]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def metric_keys(self) -> set[str]:
        """Every metric key the run has logged."""
        return set(self.client.get_run(self.run_id).data.metrics)

    def metric_steps(self, key: str) -> list[int]:
        """The step of every logged point of ``key`` (repeats when a step was logged twice)."""
        return [int(m.step) for m in self.client.get_metric_history(self.run_id, key)]

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
