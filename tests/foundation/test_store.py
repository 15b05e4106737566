"""The DuckDB store and MLflow sqlite store, real files in a temp SR1_HOME."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from sr1.errors import NotFoundError
from sr1.tracking.migrations import MIGRATIONS
from sr1.tracking.run import start_run
from sr1.tracking.store import Store


def test_migrations_apply_once_in_order(sr1_home: Path) -> None:
    store = Store()
    assert store.applied_migrations() == [n for n, _ in MIGRATIONS]
    assert store.migrate() == []  # second time: nothing to do
    assert Store().migrate() == []
    con = duckdb.connect(str(store.path))
    tables = {
        r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }
    con.close()
    assert {
        "runs",
        "step_metrics",
        "eval_results",
        "eval_summaries",
        "artifacts",
        "schema_migrations",
    } <= tables


def test_run_roundtrips_through_both_stores(sr1_home: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = {"trainer": {"lr": 1e-6, "max_steps": 3}, "model": {"name": "tiny-qwen2"}}
    art = tmp_path / "notes.txt"
    art.write_text("hello")
    with start_run("train", name="rt", config=cfg, params={"seed": 7}, model="tiny-qwen2") as run:
        run.log_metrics(0, {"reward/mean": 0.25, "kl": 0.01})
        run.log_metrics(1, {"reward/mean": 0.5})
        run.log_artifact(art)
        rid, mlid = run.run_id, run.mlflow_run_id
    store = Store()
    r = store.get_run(rid)
    assert r["status"] == "finished" and r["config"] == cfg and r["params"] == {"seed": 7}
    assert [(m["step"], m["key"], m["value"]) for m in store.step_metrics(rid)] == [
        (0, "kl", 0.01),
        (0, "reward/mean", 0.25),
        (1, "reward/mean", 0.5),
    ]
    assert (sr1_home / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{sr1_home / 'mlflow.db'}")
    mr = client.get_run(mlid)
    assert mr.info.status == "FINISHED"
    assert mr.data.params["trainer.lr"] == "1e-06" and mr.data.params["seed"] == "7"
    hist = client.get_metric_history(mlid, "reward/mean")
    assert [(h.step, h.value) for h in hist] == [(0, 0.25), (1, 0.5)]
    names = {a.path for a in client.list_artifacts(mlid)}
    assert {"notes.txt", "config.yaml"} <= names
    assert (sr1_home / "runs" / rid / "config.yaml").read_text().startswith("model:")


def test_failed_run_is_marked_and_resume_reopens(sr1_home: Path) -> None:
    with pytest.raises(RuntimeError), start_run("train", use_mlflow=False) as run:
        rid = run.run_id
        raise RuntimeError("boom")
    assert Store().get_run(rid)["status"] == "failed"
    with start_run("train", resume=rid, use_mlflow=False) as run:
        run.log_metrics(5, {"x": 1.0})
    assert Store().get_run(rid)["status"] == "finished"


def test_eval_rows_replace_not_duplicate(sr1_home: Path) -> None:
    store = Store()
    store.create_run("e1", "eval")
    row = {
        "dataset": "nq",
        "example_id": "q1",
        "golden_answers": ["a"],
        "prediction": "a",
        "em": 1.0,
        "method": "rag",
    }
    store.add_eval_results("e1", [row, {**row, "example_id": "q2", "em": 0.0}])
    store.add_eval_results("e1", [{**row, "em": 0.0}])  # re-run of q1 replaces it
    rows = store.eval_results(["e1"])
    assert [(r["example_id"], r["em"]) for r in rows] == [("q1", 0.0), ("q2", 0.0)]
    assert rows[0]["method"] == "rag" and rows[0]["golden_answers"] == ["a"]
    assert store.done_example_ids("e1", "nq") == {"q1", "q2"}
    store.add_eval_summary("e1", "nq", {"em": 0.0}, {"topk": 3}, method="rag", model="m", n=2)
    assert store.eval_summaries(["e1"])[0]["setup"] == {"topk": 3}


def test_unknown_run_lists_recent(sr1_home: Path) -> None:
    store = Store()
    store.create_run("train-abc", "train")
    with pytest.raises(NotFoundError, match="train-abc"):
        store.get_run("nope")
