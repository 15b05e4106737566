"""A run context writing to both stores: DuckDB (what ``sr1 report`` queries) and MLflow.

``with start_run(kind="train", name=..., config=cfg_dict) as run:`` creates the run in both,
saves the resolved config as ``config.yaml`` in ``run.dir`` (logged as an artifact), and marks
the run finished, failed or interrupted on exit. ``resume=RUN_ID`` reopens an existing run.

Interruption: SIGINT and SIGTERM mean the same ("stop, keep what is done"). Inside a run a
KeyboardInterrupt (Ctrl-C, or SIGTERM under :func:`interrupt_on_sigterm`) marks the run
``interrupted`` and leaves as :class:`RunInterrupted`, which says how to continue and carries
the exit code (128 + signal: 130, 143). Loops that can stop cleanly use :class:`StopSignals`:
the first signal is only recorded, the loop finishes its step, checkpoints and raises
:class:`RunInterrupted` itself; a second signal interrupts at once.

MLflow and resumes: a run opened with ``defer_mlflow_metrics=True`` (training) sends a step's
metrics to MLflow only once a checkpoint covers that step (:meth:`RunContext.commit_metrics`),
and a resume first calls :meth:`RunContext.rewind` with the checkpoint's step. So steps done
after the last checkpoint by a process that was killed never reach MLflow (they are redone
after the resume), and MLflow has each step exactly once, with the values of the run that the
checkpoint continues. DuckDB gets every step at once (``sr1 runs show`` is live); a rewind
drops its steps after the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from sr1 import paths
from sr1.errors import Sr1Error
from sr1.io import write_text_atomic
from sr1.tracking.mlflow_log import MlflowLogger
from sr1.tracking.store import Store, host_id

log = logging.getLogger(__name__)


def new_run_id(kind: str) -> str:
    return f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# -- interruption ---------------------------------------------------------------------------------
RESUME_HINTS = {
    "train": "resume with `sr1 train --resume {run_id}`",
    "eval": "resume with `sr1 eval --resume {run_id}` (or rerun the same command)",
    "sft": "sft does not resume: rerun the same `sr1 sft` command",
}


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalInterrupt(KeyboardInterrupt):
    """KeyboardInterrupt raised for a signal (SIGTERM, or a second SIGINT); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(_signame(signum))
        self.signum = signum


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; its status is ``interrupted``.

    ``str()`` is one line saying what stopped, where, and how to continue; ``exit_code`` is
    128 + the signal number (130 for SIGINT, 143 for SIGTERM). ``step``/``checkpoint`` say what
    was saved (None when the run was interrupted at once), ``result`` is what the library
    function would have returned so far. A KeyboardInterrupt subclass, so ``except Exception``
    never swallows it and callers that stop on Ctrl-C stop on it too.
    """

    def __init__(
        self,
        run_id: str | None = None,
        kind: str | None = None,
        signum: int = signal.SIGINT,
        step: int | None = None,
        checkpoint: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.run_id, self.kind, self.signum = run_id, kind, int(signum)
        self.step, self.checkpoint, self.result = step, checkpoint, result

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signame(self) -> str:
        return _signame(self.signum)

    @property
    def hint(self) -> str:
        if self.kind == "train" and self.step is not None and not self.checkpoint:
            return "it stopped before its first checkpoint: start a new run"
        h = RESUME_HINTS.get(self.kind or "")
        return h.format(run_id=self.run_id) if h and self.run_id else ""

    def __str__(self) -> str:
        msg = f"{self.kind or 'run'} run {self.run_id} stopped by {self.signame}"
        if self.step is not None:
            msg += f" after step {self.step}"
        if self.checkpoint:
            msg += f"; checkpoint {self.checkpoint}"
        elif self.step is None:
            msg += " at once (what it had saved is kept)"
        return msg + (f"; {self.hint}" if self.hint else "")


class StopSignals:
    """Graceful stop on SIGINT/SIGTERM for a loop: ``with StopSignals() as stop: ... stop.set``.

    The first signal is only recorded (``signum``; ``set`` becomes True) so the loop can finish
    its step, checkpoint and stop; a second one (either kind) raises :class:`SignalInterrupt`
    at once. The previous handlers are restored on exit. Outside the main thread (where Python
    cannot install handlers) it never fires.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def set(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise SignalInterrupt(signum)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`SignalInterrupt` (a KeyboardInterrupt) in the block, as Ctrl-C
    does: what a preempted job gets then is what Ctrl-C gets. Loops inside may still install
    :class:`StopSignals` to stop after a step. No-op outside the main thread."""

    def handle(signum: int, frame: Any) -> None:
        raise SignalInterrupt(signum)

    try:
        old = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class RunContext:
    """Handle for one run: ``run_id``, ``dir`` (checkpoints, outputs) and logging helpers."""

    def __init__(
        self,
        run_id: str,
        store: Store,
        mlflow: MlflowLogger | None,
        kind: str | None = None,
        defer_mlflow_metrics: bool = False,
    ) -> None:
        self.run_id = run_id
        self.store = store
        self.mlflow = mlflow
        self.kind = kind
        self.defer_mlflow_metrics = defer_mlflow_metrics
        self._pending: list[tuple[int, dict[str, float], int]] = []  # (step, metrics, ts ms)
        self.dir = paths.run_dir(run_id)
        self.dir.mkdir(parents=True, exist_ok=True)

    def log_params(self, params: dict[str, Any]) -> None:
        self.store.update_params(self.run_id, params)
        if self.mlflow:
            self.mlflow.log_params(params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Store one step's metrics (DuckDB at once, one transaction; it also bumps the run's
        heartbeat). MLflow gets them now, or with ``defer_mlflow_metrics`` at the next
        :meth:`commit_metrics` covering ``step``."""
        import time

        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.store.log_step_metrics(self.run_id, step, clean)
        if self.mlflow:
            if self.defer_mlflow_metrics:
                self._pending.append((int(step), clean, int(time.time() * 1000)))
            else:
                self.mlflow.log_metrics(step, clean)

    def heartbeat(self) -> None:
        """Say the run's process is alive and making progress (``sr1 runs`` liveness)."""
        self.store.heartbeat(self.run_id)

    def commit_metrics(self, upto: int | None = None) -> int:
        """Send the deferred metrics of steps <= ``upto`` (all with None) to MLflow, in step
        order; call it once a checkpoint covers those steps. Returns how many steps were sent."""
        if not self._pending:
            return 0
        now = [p for p in self._pending if upto is None or p[0] <= upto]
        self._pending = [p for p in self._pending if not (upto is None or p[0] <= upto)]
        if self.mlflow:
            for step, m, ts in sorted(now, key=lambda p: p[0]):
                self.mlflow.log_metrics(step, m, timestamp_ms=ts)
        return len(now)

    def rewind(self, step: int) -> dict[str, int]:
        """Make both stores hold exactly the steps <= ``step`` (resuming from that step's
        checkpoint): DuckDB drops later steps; MLflow gets the (step, key) points it lacks up
        to ``step`` from DuckDB (a kill between a checkpoint and its commit). MLflow cannot
        delete points, so points after ``step`` already there (a run that logged before its
        checkpoints, e.g. by an older sr1) are counted, tagged and warned about, not removed.
        """
        from datetime import UTC

        out = {"dropped": self.store.delete_step_metrics_after(self.run_id, step)}
        out["refilled"] = out["beyond"] = 0
        self._pending = [p for p in self._pending if p[0] <= step]
        if not self.mlflow:
            return out
        points = self.store.step_metric_points(self.run_id, upto=step)
        keys = {k for _, k, _, _ in points} | self.mlflow.metric_keys()
        have: dict[str, set[int]] = {}
        for k in sorted(keys):
            steps = self.mlflow.metric_steps(k)
            have[k] = set(steps)
            out["beyond"] += sum(1 for s in steps if s > step)
        missing = [
            (k, v, int(at.replace(tzinfo=UTC).timestamp() * 1000), s)
            for s, k, v, at in points
            if s not in have.get(k, set())
        ]
        self.mlflow.log_points(missing)
        out["refilled"] = len(missing)
        if out["beyond"]:
            self.mlflow.set_tag("sr1.points_after_resume_step", f"{out['beyond']} (step {step})")
            log.warning(
                "run %s: MLflow already holds %d metric points after step %d (logged before "
                "this resume by a process that did not defer them); MLflow cannot delete them",
                self.run_id,
                out["beyond"],
                step,
            )
        return out

    def log_artifact(self, path: str | Path, kind: str | None = None) -> None:
        self.store.add_artifact(self.run_id, str(path), kind)
        if self.mlflow:
            self.mlflow.log_artifact(path)

    @property
    def mlflow_run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None


class FollowerRun:
    """A data-parallel rank's view (rank > 0) of the run rank 0 tracks: its id and folder.

    Logging calls do nothing: rank 0 alone writes DuckDB, MLflow and artifacts, with metrics
    already reduced over the ranks."""

    mlflow = None
    mlflow_run_id = None

    def __init__(self, run_id: str, kind: str | None = None) -> None:
        self.run_id, self.kind = run_id, kind
        self.dir = paths.run_dir(run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def heartbeat(self) -> None:
        pass

    def commit_metrics(self, upto: int | None = None) -> int:
        return 0

    def rewind(self, step: int) -> dict[str, int]:
        return {}

    def log_artifact(self, path: str | Path, kind: str | None = None) -> None:
        pass


@contextlib.contextmanager
def start_run_on_rank0(acc: Any, **kwargs: Any) -> Iterator[RunContext | FollowerRun]:
    """:func:`start_run` on the main process of ``acc`` (an Accelerate ``Accelerator``); the
    other ranks get a :class:`FollowerRun` of the same run id. When rank 0 cannot open the run
    (e.g. a resume that is refused), every rank raises its error instead of waiting."""
    if acc.num_processes == 1:
        with start_run(**kwargs) as run:
            yield run
        return
    from accelerate.utils import broadcast_object_list

    def share(obj: Any) -> Any:
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    if not acc.is_main_process:
        got = share(None)
        if isinstance(got, dict):  # rank 0's error
            raise Sr1Error(got["error"])
        yield FollowerRun(str(got), kwargs.get("kind"))
        return
    with contextlib.ExitStack() as stack:
        try:
            run = stack.enter_context(start_run(**kwargs))
        except Exception as e:
            share({"error": f"rank 0 could not open the run: {e}"})
            raise
        share(run.run_id)
        yield run


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
    defer_mlflow_metrics: bool = False,
) -> Iterator[RunContext]:
    """Open (or with ``resume``, reopen) a run in DuckDB and MLflow; close it with its outcome.

    The run records this process (pid, host) as its owner. A KeyboardInterrupt in the block
    marks it ``interrupted`` and leaves as :class:`RunInterrupted`; another exception marks it
    ``failed``. Resuming a run whose recorded process is still alive on this host is refused.
    ``defer_mlflow_metrics``: see :meth:`RunContext.commit_metrics`; a finished run commits all.
    """
    store = Store()
    if resume:
        existing = store.get_run(resume)
        alive_here = existing["status"] == "running" and existing.get("host_id") == host_id()
        if alive_here and existing.get("pid") not in (None, os.getpid()):
            raise Sr1Error(
                f"run {resume!r} is still running (pid {existing['pid']} on "
                f"{existing.get('host')})",
                hint=f"stop it first (kill -TERM {existing['pid']} saves a checkpoint), or "
                "wait for it to finish",
            )
        ml = None
        if use_mlflow:
            ml = (
                MlflowLogger(experiment, mlflow_uri, run_id=existing["mlflow_run_id"])
                if existing["mlflow_run_id"]
                else None
            )
        store.claim(resume)
        ctx = RunContext(resume, store, ml, kind, defer_mlflow_metrics)
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
        ctx = RunContext(rid, store, ml, kind, defer_mlflow_metrics)
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
    except KeyboardInterrupt as e:
        store.set_status(ctx.run_id, "interrupted")
        if ctx.mlflow:
            ctx.mlflow.end("KILLED")
        if isinstance(e, RunInterrupted):
            e.run_id, e.kind = e.run_id or ctx.run_id, e.kind or kind
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        raise RunInterrupted(run_id=ctx.run_id, kind=kind, signum=signum) from e
    except BaseException:
        store.set_status(ctx.run_id, "failed")
        if ctx.mlflow:
            ctx.mlflow.end("FAILED")
        raise
    else:
        ctx.commit_metrics()
        store.set_status(ctx.run_id, "finished")
        if ctx.mlflow:
            ctx.mlflow.end("FINISHED")
