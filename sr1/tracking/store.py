"""The DuckDB run/result store at ``$SR1_HOME/sr1.duckdb``: runs, step metrics, eval rows, summaries.

The schema changes only through the ordered, named migrations in ``sr1.tracking.migrations``;
applied ones are recorded in ``schema_migrations``. Connections are short-lived so several
processes (a trainer and ``sr1 report``) can take turns on one file.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from sr1 import paths
from sr1.errors import NotFoundError, Sr1Error
from sr1.tracking.migrations import MIGRATIONS


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str, sort_keys=True)


class Store:
    """Thin typed access to the DuckDB file. Every write is a single transaction."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else paths.duckdb_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.migrate()

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        # DuckDB allows one writer process at a time; retry briefly if another holds the lock.
        last: Exception | None = None
        for attempt in range(50):
            try:
                con = duckdb.connect(str(self.path))
                break
            except duckdb.IOException as e:
                last = e
                time.sleep(0.1 * min(attempt + 1, 10))
        else:
            raise Sr1Error(
                f"cannot open {self.path}: {last}", hint="is another sr1 process holding it?"
            )
        try:
            yield con
        finally:
            con.close()

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
        with self.connect() as con:
            con.execute(
                "INSERT INTO runs (run_id, kind, name, status, model, parent_run, mlflow_run_id, config_json,"
                " params_json, started_at) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    kind,
                    name,
                    model,
                    parent_run,
                    mlflow_run_id,
                    _dumps(config or {}),
                    _dumps(params or {}),
                    _now(),
                ],
            )

    def set_status(self, run_id: str, status: str, ended: bool = True) -> None:
        with self.connect() as con:
            con.execute(
                "UPDATE runs SET status = ?, ended_at = ? WHERE run_id = ?",
                [status, _now() if ended else None, run_id],
            )

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
    def log_step_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        rows = [
            (run_id, int(step), k, float(v), _now()) for k, v in metrics.items() if v is not None
        ]
        if not rows:
            return
        with self.connect() as con:
            con.executemany("INSERT OR REPLACE INTO step_metrics VALUES (?, ?, ?, ?, ?)", rows)

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
        with self.connect() as con:
            con.executemany(
                f"INSERT OR REPLACE INTO eval_results VALUES ({', '.join('?' * len(self._EVAL_COLS))})",
                vals,
            )

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
