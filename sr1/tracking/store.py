"""The DuckDB run/result store at ``$SR1_HOME/sr1.duckdb``: runs, step metrics, eval rows, summaries.

A run row records the process that runs it (pid, host, heartbeat); reading a ``running`` run
whose process is gone reports it ``dead`` (:func:`run_liveness`). The stored status is not
rewritten by a read.

The schema changes only through the ordered, named migrations in ``sr1.tracking.migrations``;
applied ones are recorded in ``schema_migrations``. Connections are short-lived and taken under
a file lock (``sr1.duckdb.lock``) so several processes (a trainer, an eval, ``sr1 report``, two
commands started at once on a fresh home) take turns on one file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from sr1 import paths
from sr1.errors import NotFoundError, Sr1Error
from sr1.locks import file_lock
from sr1.tracking.migrations import MIGRATIONS


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str, sort_keys=True)


# -- which process owns a run ---------------------------------------------------------------------
# A run row records the pid, host name and "host id" of the process running it. The host id is
# the kernel boot id plus the pid namespace: the scope in which a pid names one process (two
# containers on one machine share a host name but not a pid namespace). A recorded process is
# checked only where that scope matches; elsewhere the heartbeat decides.
STALE_AFTER_S = 1800.0  # a running run on another host with no heartbeat for this long is dead


def this_host() -> str:
    import socket

    return socket.gethostname()


def host_id() -> str:
    """``boot_id/pid-namespace`` where /proc has them (Linux), else the host name."""
    parts = []
    for f in ("/proc/sys/kernel/random/boot_id",):
        with contextlib.suppress(OSError):
            parts.append(Path(f).read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts) if parts else this_host()


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), or None if unknown or gone."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return None
    try:
        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def process_alive(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` is a live (not zombie) process on this host, and the same process that
    started at ``started`` (epoch seconds, 1 s tolerance) when that is given."""
    if pid <= 0:
        return False
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(p.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # access denied: it exists
        return True


def owner_fields() -> dict[str, Any]:
    """This process as a run's owner: pid, host, host_id, pid_started."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": this_host(),
        "host_id": host_id(),
        "pid_started": process_start_time(pid),
    }


def run_liveness(run: dict[str, Any], stale_after_s: float = STALE_AFTER_S) -> tuple[str, str]:
    """``(status, reason)`` for a run row: a ``running`` run whose process is gone is ``dead``.

    On the recording host (same host id) the pid decides at once; on another host a heartbeat
    older than ``stale_after_s`` does. Rows from before owners were recorded stay as stored.
    """
    status = run.get("status")
    if status != "running" or run.get("pid") is None:
        return status, ""
    pid, host = int(run["pid"]), run.get("host") or "?"
    if run.get("host_id") == host_id():
        if process_alive(pid, run.get("pid_started")):
            return "running", ""
        return "dead", f"process {pid} on {host} is gone"
    beat = run.get("heartbeat_at") or run.get("started_at")
    if beat is not None:
        age = (_now() - beat).total_seconds()
        if age > stale_after_s:
            return "dead", f"no heartbeat from {host} (pid {pid}) for {age:.0f} s"
    return "running", ""


class Store:
    """Thin typed access to the DuckDB file. Every write is a single transaction."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else paths.duckdb_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.migrate()

    @property
    def lock_path(self) -> Path:
        """The flock file next to the database that serialises sr1 processes' connections."""
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection, held under the store's file lock (``sr1.locks``).

        DuckDB lets one process at a time open the file, so sr1 processes take turns through
        the lock (one open, a few statements, close); a process outside sr1 holding the file
        (the duckdb shell, a notebook) is waited for with retries on DuckDB's lock error.
        """
        with file_lock(self.lock_path, what="the DuckDB store"):
            con = self._open()
            try:
                yield con
            finally:
                con.close()

    def _open(self, wait_s: float = 30.0) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.IOException as e:
                if "lock" not in str(e).lower():
                    raise Sr1Error(f"cannot open {self.path}: {e}") from None
                if time.monotonic() >= deadline:
                    raise Sr1Error(
                        f"cannot open {self.path}: {e}",
                        hint="another process (not sr1) holds the DuckDB file; close it and retry",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- schema -------------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply pending migrations in order; returns the names applied now."""
        applied_now: list[str] = []
        with self.connect() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP)"
            )
            done = {r[0] for r in con.execute("SELECT name FROM schema_migrations").fetchall()}
            for name, sql in MIGRATIONS:
                if name in done:
                    continue
                con.execute("BEGIN")
                try:
                    con.execute(sql)
                    con.execute("INSERT INTO schema_migrations VALUES (?, ?)", [name, _now()])
                    con.execute("COMMIT")
                except Exception:
                    con.execute("ROLLBACK")
                    raise
                applied_now.append(name)
        return applied_now

    def applied_migrations(self) -> list[str]:
        with self.connect() as con:
            return [
                r[0]
                for r in con.execute("SELECT name FROM schema_migrations ORDER BY name").fetchall()
            ]

    # -- runs ---------------------------------------------------------------------------------
    def create_run(
        self,
        run_id: str,
        kind: str,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        model: str | None = None,
        parent_run: str | None = None,
        mlflow_run_id: str | None = None,
    ) -> None:
        """Insert a ``running`` run owned by this process (pid, host, heartbeat now)."""
        own = owner_fields()
        now = _now()
        with self.connect() as con:
            con.execute(
                "INSERT INTO runs (run_id, kind, name, status, model, parent_run, mlflow_run_id, config_json,"
                " params_json, started_at, pid, host, host_id, pid_started, heartbeat_at)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    kind,
                    name,
                    model,
                    parent_run,
                    mlflow_run_id,
                    _dumps(config or {}),
                    _dumps(params or {}),
                    now,
                    own["pid"],
                    own["host"],
                    own["host_id"],
                    own["pid_started"],
                    now,
                ],
            )

    def set_status(self, run_id: str, status: str, ended: bool = True) -> None:
        with self.connect() as con:
            con.execute(
                "UPDATE runs SET status = ?, ended_at = ? WHERE run_id = ?",
                [status, _now() if ended else None, run_id],
            )

    def claim(self, run_id: str) -> None:
        """Mark ``run_id`` running again, owned by this process (a resume)."""
        own = owner_fields()
        with self.connect() as con:
            con.execute(
                "UPDATE runs SET status = 'running', ended_at = NULL, pid = ?, host = ?,"
                " host_id = ?, pid_started = ?, heartbeat_at = ? WHERE run_id = ?",
                [own["pid"], own["host"], own["host_id"], own["pid_started"], _now(), run_id],
            )

    def heartbeat(self, run_id: str) -> None:
        """Record that the run's process is alive and making progress now."""
        with self.connect() as con:
            con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ?", [_now(), run_id])

    def update_params(self, run_id: str, params: dict[str, Any]) -> None:
        run = self.get_run(run_id)
        merged = {**run["params"], **params}
        with self.connect() as con:
            con.execute(
                "UPDATE runs SET params_json = ? WHERE run_id = ?", [_dumps(merged), run_id]
            )

    def _run_row(self, row: tuple, cols: list[str]) -> dict[str, Any]:
        d = dict(zip(cols, row, strict=True))
        d["config"] = json.loads(d.pop("config_json") or "{}")
        d["params"] = json.loads(d.pop("params_json") or "{}")
        status, reason = run_liveness(d)
        if status != d["status"]:  # e.g. "running" in the file, but its process is gone
            d["stored_status"], d["status"], d["status_reason"] = d["status"], status, reason
        return d

    def list_runs(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self.connect() as con:
            q = "SELECT * FROM runs" + (" WHERE kind = ?" if kind else "") + " ORDER BY started_at"
            cur = con.execute(q, [kind] if kind else [])
            cols = [c[0] for c in cur.description]
            return [self._run_row(r, cols) for r in cur.fetchall()]

    def get_run(self, run_id: str) -> dict[str, Any]:
        with self.connect() as con:
            cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
            cols = [c[0] for c in cur.description]
            row = cur.fetchone()
            if row is None:
                known = [
                    r[0]
                    for r in con.execute(
                        "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 10"
                    ).fetchall()
                ]
                raise NotFoundError(
                    f"unknown run id {run_id!r}",
                    hint=("recent runs: " + ", ".join(known))
                    if known
                    else "no runs recorded yet in this SR1_HOME",
                )
            return self._run_row(row, cols)

    def find_runs(self, prefix: str) -> list[str]:
        with self.connect() as con:
            return [
                r[0]
                for r in con.execute(
                    "SELECT run_id FROM runs WHERE run_id LIKE ?", [prefix + "%"]
                ).fetchall()
            ]

    # -- step metrics -------------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
        con.execute("BEGIN")
        try:
            yield
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def log_step_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        """Store one step's metrics (replacing that step's earlier values) and bump the run's
        heartbeat, in one transaction: a kill leaves the whole step or none of it."""
        now = _now()
        rows = [(run_id, int(step), k, float(v), now) for k, v in metrics.items() if v is not None]
        if not rows:
            return
        with self.connect() as con, self._transaction(con):
            con.executemany("INSERT OR REPLACE INTO step_metrics VALUES (?, ?, ?, ?, ?)", rows)
            con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ?", [now, run_id])

    def step_metric_points(
        self, run_id: str, upto: int | None = None
    ) -> list[tuple[int, str, float, datetime]]:
        """``(step, key, value, logged_at)`` of the run's steps (only steps <= ``upto``)."""
        q = "SELECT step, key, value, logged_at FROM step_metrics WHERE run_id = ?"
        args: list[Any] = [run_id]
        if upto is not None:
            q += " AND step <= ?"
            args.append(int(upto))
        with self.connect() as con:
            return [tuple(r) for r in con.execute(q + " ORDER BY step, key", args).fetchall()]

    def delete_step_metrics_after(self, run_id: str, step: int) -> int:
        """Drop the run's metrics of steps after ``step`` (a resume from that step's checkpoint
        redoes them); returns how many values were dropped."""
        with self.connect() as con, self._transaction(con):
            (n,) = con.execute(
                "SELECT count(*) FROM step_metrics WHERE run_id = ? AND step > ?", [run_id, step]
            ).fetchone()
            con.execute("DELETE FROM step_metrics WHERE run_id = ? AND step > ?", [run_id, step])
        return int(n)

    def step_metrics(self, run_id: str) -> list[dict[str, Any]]:
        with self.connect() as con:
            rows = con.execute(
                "SELECT step, key, value FROM step_metrics WHERE run_id = ? ORDER BY step, key",
                [run_id],
            ).fetchall()
        return [{"step": s, "key": k, "value": v} for s, k, v in rows]

    # -- eval ---------------------------------------------------------------------------------
    _EVAL_COLS = [
        "run_id",
        "dataset",
        "example_id",
        "question",
        "golden_answers",
        "prediction",
        "em",
        "cover_em",
        "f1",
        "answer_in_docs",
        "well_formed",
        "num_searches",
        "response_tokens",
        "response",
        "extra_json",
    ]

    def add_eval_results(self, run_id: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert per-example results; re-inserting an example replaces it (resume never duplicates)."""
        if not rows:
            return
        vals = []
        for r in rows:
            extra = {k: v for k, v in r.items() if k not in self._EVAL_COLS}
            vals.append(
                (
                    run_id,
                    r["dataset"],
                    str(r["example_id"]),
                    r.get("question"),
                    _dumps(list(r.get("golden_answers") or [])),
                    r.get("prediction"),
                    r.get("em"),
                    r.get("cover_em"),
                    r.get("f1"),
                    r.get("answer_in_docs"),
                    r.get("well_formed"),
                    r.get("num_searches"),
                    r.get("response_tokens"),
                    r.get("response"),
                    _dumps(extra),
                )
            )
        with self.connect() as con, self._transaction(con):
            con.executemany(
                f"INSERT OR REPLACE INTO eval_results VALUES ({', '.join('?' * len(self._EVAL_COLS))})",
                vals,
            )
            con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ?", [_now(), run_id])

    def done_example_ids(self, run_id: str, dataset: str) -> set[str]:
        with self.connect() as con:
            rows = con.execute(
                "SELECT example_id FROM eval_results WHERE run_id = ? AND dataset = ?",
                [run_id, dataset],
            ).fetchall()
        return {r[0] for r in rows}

    def eval_results(
        self, run_ids: Sequence[str] | None = None, dataset: str | None = None
    ) -> list[dict[str, Any]]:
        q = "SELECT * FROM eval_results WHERE 1=1"
        args: list[Any] = []
        if run_ids:
            q += f" AND run_id IN ({', '.join('?' * len(run_ids))})"
            args += list(run_ids)
        if dataset:
            q += " AND dataset = ?"
            args.append(dataset)
        with self.connect() as con:
            cur = con.execute(q + " ORDER BY run_id, dataset, example_id", args)
            cols = [c[0] for c in cur.description]
            out = []
            for row in cur.fetchall():
                d = dict(zip(cols, row, strict=True))
                d["golden_answers"] = json.loads(d["golden_answers"] or "[]")
                d.update(json.loads(d.pop("extra_json") or "{}"))
                out.append(d)
        return out

    def add_eval_summary(
        self,
        run_id: str,
        dataset: str,
        metrics: dict[str, Any],
        setup: dict[str, Any] | None = None,
        method: str | None = None,
        model: str | None = None,
        n: int | None = None,
    ) -> None:
        with self.connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO eval_summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, dataset, method, model, n, _dumps(metrics), _dumps(setup or {}), _now()],
            )

    def eval_summaries(self, run_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM eval_summaries"
        args: list[Any] = []
        if run_ids:
            q += f" WHERE run_id IN ({', '.join('?' * len(run_ids))})"
            args = list(run_ids)
        with self.connect() as con:
            cur = con.execute(q + " ORDER BY created_at, run_id, dataset", args)
            cols = [c[0] for c in cur.description]
            out = []
            for row in cur.fetchall():
                d = dict(zip(cols, row, strict=True))
                d["metrics"] = json.loads(d.pop("metrics_json") or "{}")
                d["setup"] = json.loads(d.pop("setup_json") or "{}")
                out.append(d)
        return out

    # -- artifacts ----------------------------------------------------------------------------
    def add_artifact(self, run_id: str, path: str, kind: str | None = None) -> None:
        with self.connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?)", [run_id, path, kind, _now()]
            )

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        with self.connect() as con:
            rows = con.execute(
                "SELECT path, kind FROM artifacts WHERE run_id = ? ORDER BY path", [run_id]
            ).fetchall()
        return [{"path": p, "kind": k} for p, k in rows]
