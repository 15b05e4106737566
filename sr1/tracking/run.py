"""A run context writing to both stores: DuckDB (what ``sr1 report`` queries) and MLflow.

``with start_run(kind="train", name=..., config=cfg_dict) as run:`` creates the run in both,
saves the resolved config as ``config.yaml`` in ``run.dir`` (logged as an artifact), and marks
the run finished, failed or interrupted on exit. ``resume=RUN_ID`` reopens an existing run.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from sr1 import paths
from sr1.io import write_text_atomic
from sr1.tracking.mlflow_log import MlflowLogger
from sr1.tracking.store import Store


def new_run_id(kind: str) -> str:
    return f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class RunContext:
    """Handle for one run: ``run_id``, ``dir`` (checkpoints, outputs) and logging helpers."""

    def __init__(self, run_id: str, store: Store, mlflow: MlflowLogger | None) -> None:
        self.run_id = run_id
        self.store = store
        self.mlflow = mlflow
        self.dir = paths.runs_dir() / run_id
        self.dir.mkdir(parents=True, exist_ok=True)

    def log_params(self, params: dict[str, Any]) -> None:
        self.store.update_params(self.run_id, params)
        if self.mlflow:
            self.mlflow.log_params(params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.store.log_step_metrics(self.run_id, step, clean)
        if self.mlflow:
            self.mlflow.log_metrics(step, clean)

    def log_artifact(self, path: str | Path, kind: str | None = None) -> None:
        self.store.add_artifact(self.run_id, str(path), kind)
        if self.mlflow:
            self.mlflow.log_artifact(path)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None


@contextlib.contextmanager
def start_run(
    kind: str,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    model: str | None = None,
    parent_run: str | None = None,
    resume: str | None = None,
    experiment: str = "sr1",
    mlflow_uri: str | None = None,
    use_mlflow: bool = True,
    run_id: str | None = None,
) -> Iterator[RunContext]:
    """Open (or with ``resume``, reopen) a run in DuckDB and MLflow; close it with its outcome."""
    store = Store()
    if resume:
        existing = store.get_run(resume)
        ml = None
        if use_mlflow:
            ml = (
                MlflowLogger(experiment, mlflow_uri, run_id=existing["mlflow_run_id"])
                if existing["mlflow_run_id"]
                else None
            )
        store.set_status(resume, "running", ended=False)
        ctx = RunContext(resume, store, ml)
    else:
        rid = run_id or new_run_id(kind)
        ml = (
            MlflowLogger(
                experiment,
                mlflow_uri,
                run_name=name or rid,
                tags={"sr1.run_id": rid, "sr1.kind": kind},
            )
            if use_mlflow
            else None
        )
        store.create_run(
            rid,
            kind,
            name=name,
            config=config,
            params=params,
            model=model,
            parent_run=parent_run,
            mlflow_run_id=ml.run_id if ml else None,
        )
        ctx = RunContext(rid, store, ml)
        if config is not None:
            cfg_path = ctx.dir / "config.yaml"
            write_text_atomic(cfg_path, yaml.safe_dump(config, sort_keys=True))
            if ml:
                ml.log_params(config)
            ctx.log_artifact(cfg_path, kind="config")
        if params and ml:
            ml.log_params(params)
    try:
        yield ctx
    except KeyboardInterrupt:
        store.set_status(ctx.run_id, "interrupted")
        if ctx.mlflow:
            ctx.mlflow.end("KILLED")
        raise
    except BaseException:
        store.set_status(ctx.run_id, "failed")
        if ctx.mlflow:
            ctx.mlflow.end("FAILED")
        raise
    else:
        store.set_status(ctx.run_id, "finished")
        if ctx.mlflow:
            ctx.mlflow.end("FINISHED")
