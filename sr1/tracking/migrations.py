"""Ordered, named schema migrations for the DuckDB store. Append new ones; never edit old ones."""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_runs",
        """
        CREATE TABLE runs (
            run_id      VARCHAR PRIMARY KEY,
            kind        VARCHAR NOT NULL,      -- train, sft, eval, rollout, quickstart
            name        VARCHAR,
            status      VARCHAR NOT NULL,      -- running, finished, failed, interrupted
            model       VARCHAR,
            parent_run  VARCHAR,
            mlflow_run_id VARCHAR,
            config_json VARCHAR,               -- the resolved config
            params_json VARCHAR,
            started_at  TIMESTAMP NOT NULL,
            ended_at    TIMESTAMP
        );
        """,
    ),
    (
        "002_step_metrics",
        """
        CREATE TABLE step_metrics (
            run_id VARCHAR NOT NULL,
            step   INTEGER NOT NULL,
            key    VARCHAR NOT NULL,
            value  DOUBLE,
            logged_at TIMESTAMP NOT NULL,
            PRIMARY KEY (run_id, step, key)
        );
        """,
    ),
    (
        "003_eval_results",
        """
        CREATE TABLE eval_results (
            run_id        VARCHAR NOT NULL,
            dataset       VARCHAR NOT NULL,
            example_id    VARCHAR NOT NULL,
            question      VARCHAR,
            golden_answers VARCHAR,            -- JSON list
            prediction    VARCHAR,
            em            DOUBLE,
            cover_em      DOUBLE,
            f1            DOUBLE,
            answer_in_docs DOUBLE,
            well_formed   DOUBLE,
            num_searches  INTEGER,
            response_tokens INTEGER,
            response      VARCHAR,
            extra_json    VARCHAR,
            PRIMARY KEY (run_id, dataset, example_id)
        );
        """,
    ),
    (
        "004_eval_summaries",
        """
        CREATE TABLE eval_summaries (
            run_id   VARCHAR NOT NULL,
            dataset  VARCHAR NOT NULL,
            method   VARCHAR,
            model    VARCHAR,
            n        INTEGER,
            metrics_json VARCHAR,              -- em, f1, cover_em, answer_in_docs, searches, ...
            setup_json   VARCHAR,              -- what makes numbers comparable: index hash, topk, template, ...
            created_at TIMESTAMP NOT NULL,
            PRIMARY KEY (run_id, dataset)
        );
        """,
    ),
    (
        "005_artifacts",
        """
        CREATE TABLE artifacts (
            run_id VARCHAR NOT NULL,
            path   VARCHAR NOT NULL,
            kind   VARCHAR,
            logged_at TIMESTAMP NOT NULL,
            PRIMARY KEY (run_id, path)
        );
        """,
    ),
    (
        # Who runs a run, so a run whose process is gone reads "dead" instead of "running"
        # forever (sr1.tracking.store.run_liveness). host_id is the boot id + pid namespace:
        # the scope in which pid means one process; pid_started (epoch seconds) catches a
        # reused pid; heartbeat_at is bumped by every step's metrics, eval batch and heartbeat.
        "006_run_owner",
        """
        ALTER TABLE runs ADD COLUMN pid INTEGER;
        ALTER TABLE runs ADD COLUMN host VARCHAR;
        ALTER TABLE runs ADD COLUMN host_id VARCHAR;
        ALTER TABLE runs ADD COLUMN pid_started DOUBLE;
        ALTER TABLE runs ADD COLUMN heartbeat_at TIMESTAMP;
        """,
    ),
]
