"""Reports over rows inserted into a real DuckDB file: every format checked against exact numbers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sr1.cli.main import app
from sr1.errors import NotFoundError, Sr1Error
from sr1.eval.metrics import summarize
from sr1.report import build_report, render
from sr1.tracking.run import start_run
from sr1.tracking.store import Store

# (dataset, id, em_a, em_b, searches_a, searches_b, answer_in_docs_a)
EXAMPLES = [
    ("nq", "n1", 1, 1, 0, 1, 1.0),
    ("nq", "n2", 0, 1, 1, 2, 0.0),
    ("nq", "n3", 0, 0, 1, 1, 1.0),
    ("nq", "n4", 1, 1, 2, 1, 1.0),
    ("hotpotqa", "h1", 0, 1, 2, 3, 0.0),
    ("hotpotqa", "h2", 1, 1, 2, 2, 1.0),
]


def _rows(which: str) -> list[dict]:
    out = []
    for d, i, ea, eb, sa, sb, ida in EXAMPLES:
        em = ea if which == "a" else eb
        out.append(
            {
                "dataset": d,
                "example_id": i,
                "question": f"question {i}?",
                "golden_answers": [f"gold {i}", "alias"],
                "prediction": f"gold {i}" if em else "wrong",
                "em": float(em),
                # the gold inside a longer answer: cover-EM 1, EM 0 (n3 and h1)
                "cover_em": float(em or i in ("n3", "h1")),
                "f1": 0.5 if not em else 1.0,
                "answer_in_docs": ida if which == "a" else 1.0,
                "well_formed": 1.0,
                "num_searches": sa if which == "a" else sb,
                "response_tokens": 10 if which == "a" else 20,
                "response": "<answer> x </answer>",
                "finish_reason": "answer",
                "seconds": 0.5,
            }
        )
    return out


@pytest.fixture()
def store_with_runs(sr1_home: Path) -> dict[str, str]:
    """Two eval runs (A: rag, B: search from a train run) and a train run with step metrics."""
    with start_run("train", name="ppo-tiny", config={"algorithm": {"name": "ppo"}}) as tr:
        for step, (r, length, s) in enumerate([(0.1, 50, 0.2), (0.3, 40, 0.8), (0.5, 60, 1.4)]):
            tr.log_metrics(  # the keys sr1's trainer logs
                step,
                {
                    "reward/mean": r,
                    "reward/em": 0.0,
                    "length/response_mean": length,
                    "search/mean": s,
                },
            )
    store = Store()
    store.create_run("eval-a", "eval", name="rag-base", model="smollm2-135m")
    store.create_run("eval-b", "eval", name="search-ppo", model="m", parent_run=tr.run_id)
    for rid, which, method in (("eval-a", "a", "rag"), ("eval-b", "b", "search")):
        rows = _rows(which)
        store.add_eval_results(rid, rows)
        for d in ("nq", "hotpotqa"):
            ds_rows = [r for r in rows if r["dataset"] == d]
            setup = {"split": "dev", "limit": 4, "topk": 3, "examples_hash": f"h-{d}"}
            store.add_eval_summary(
                rid, d, summarize(ds_rows), setup, method=method, model="m", n=len(ds_rows)
            )
        store.set_status(rid, "finished")
    return {"a": "eval-a", "b": "eval-b", "train": tr.run_id}


def test_table_values_deltas_and_search_tables_exact(store_with_runs: dict[str, str]) -> None:
    rep = build_report(baseline="eval-a", n_boot=200)
    assert rep["datasets"] == ["nq", "hotpotqa"]  # paper column order, only present ones
    rows = {r["run_id"]: r for r in rep["rows"]}
    assert set(rows) == {"eval-a", "eval-b"}
    a, b = rows["eval-a"], rows["eval-b"]
    assert a["values"] == {"nq": 0.5, "hotpotqa": 0.5} and a["avg"] == 0.5
    assert b["values"] == {"nq": 0.75, "hotpotqa": 1.0} and b["avg"] == 0.875
    assert b["n"] == {"nq": 4, "hotpotqa": 2} and b["avg_over"] == 2
    assert b["delta"] == {"nq": 0.25, "hotpotqa": 0.5, "avg": 0.375}
    assert a["delta"] == {"nq": 0.0, "hotpotqa": 0.0, "avg": 0.0}
    assert b["label"] == "search-ppo" and b["method"] == "search"
    # bootstrap CI brackets the mean and stays inside [0, 1]; all-correct has a point interval
    assert 0.0 <= a["ci"]["nq"][0] <= 0.5 <= a["ci"]["nq"][1] <= 1.0
    assert b["ci"]["hotpotqa"] == [1.0, 1.0]
    assert a["avg_ci"][0] <= 0.5 <= a["avg_ci"][1]
    # search behaviour by dataset and pooled by hop group
    sd = {(s["run_id"], s["dataset"]): s for s in rep["search_by_dataset"]}
    assert sd[("eval-a", "nq")]["searches_mean"] == 1.0
    assert sd[("eval-a", "nq")]["searches_dist"] == {"0": 1, "1": 2, "2": 1}
    assert sd[("eval-a", "nq")]["answer_in_docs"] == 0.75
    assert sd[("eval-b", "hotpotqa")]["searches_mean"] == 2.5
    assert sd[("eval-a", "hotpotqa")]["hops"] == "multi"
    assert sd[("eval-a", "nq")]["em"] == 0.5 and sd[("eval-a", "nq")]["cover_em"] == 0.75
    assert sd[("eval-b", "nq")]["cover_em"] == 1.0
    hops = {(h["run_id"], h["group"]): h for h in rep["search_by_hops"]}
    assert hops[("eval-b", "single")]["em"] == 0.75 and hops[("eval-b", "single")]["n"] == 4
    assert hops[("eval-b", "multi")]["searches_mean"] == 2.5
    assert hops[("eval-a", "multi")]["answer_in_docs"] == 0.5
    assert hops[("eval-a", "multi")]["em"] == 0.5 and hops[("eval-a", "multi")]["cover_em"] == 1.0
    assert hops[("eval-a", "single")]["cover_em"] == 0.75
    assert rep["warnings"] == []
    assert rep["train_runs"] == [store_with_runs["train"]]


def test_compare_paired_test_and_flips(store_with_runs: dict[str, str]) -> None:
    rep = build_report(["eval-a", "eval-b"], compare=("eval-a", "eval-b"), n_boot=200)
    c = rep["compare"]
    assert c["shared_examples"] == 6 and c["only_a"] == 0
    assert c["gained"] == 2 and c["lost"] == 0
    assert [(f["dataset"], f["example_id"], f["direction"]) for f in c["flipped"]] == [
        ("nq", "n2", "gained"),
        ("hotpotqa", "h1", "gained"),
    ]
    assert (
        c["flipped"][0]["a_prediction"] == "wrong" and c["flipped"][0]["b_prediction"] == "gold n2"
    )
    o = c["overall"]
    assert o["n"] == 6 and o["diff"] == pytest.approx(2 / 6)
    assert o["b_better"] == 2 and o["a_better"] == 0 and o["ties"] == 4
    # 2 non-zero differences: the sign flips ++ and -- (half of them) reach |diff| >= observed
    assert o["p_value"] == pytest.approx(0.5, abs=0.02)
    assert c["per_dataset"]["nq"]["diff"] == 0.25


def test_every_format_has_the_exact_numbers(store_with_runs: dict[str, str]) -> None:
    rep = build_report(baseline="eval-a", compare=("eval-a", "eval-b"), n_boot=200)

    md = render(rep, "markdown")
    assert "| nq | hotpotqa | avg |" in md
    assert "| search-ppo | eval-b | 0.750 (+0.250) | 1.000 (+0.500) | 0.875 (+0.375) |" in md
    assert "| rag-base | eval-a | 0.500 (+0.000) | 0.500 (+0.000) | 0.500 (+0.000) |" in md
    assert "| search-ppo | hotpotqa | multi | 2 | 2.50 | 2:1 3:1 | 1.000 | 1.000 |" in md
    assert "| nq | n2 | question n2? | gold n2 \\| alias | wrong | gold n2 | gained |" in md

    lines = list(csv.DictReader(io.StringIO(render(rep, "csv"))))
    by = {r["run_id"]: r for r in lines}
    assert float(by["eval-b"]["nq"]) == 0.75 and float(by["eval-b"]["avg"]) == 0.875
    assert float(by["eval-b"]["hotpotqa_delta"]) == 0.5 and by["eval-b"]["nq_n"] == "4"
    assert float(by["eval-a"]["hotpotqa"]) == 0.5 and by["eval-a"]["label"] == "rag-base"
    assert float(by["eval-b"]["hotpotqa_ci_lo"]) == 1.0

    doc = json.loads(render(rep, "json"))
    assert doc["rows"][0]["values"]["nq"] in (0.5, 0.75)
    assert {r["run_id"]: r["avg"] for r in doc["rows"]} == {"eval-a": 0.5, "eval-b": 0.875}
    assert doc["compare"]["gained"] == 2

    console = Console(record=True, width=250)
    for t in render(rep, "table"):
        console.print(t)
    text = console.export_text()
    assert "0.875 (+0.375)" in text and "search-ppo" in text and "Flipped questions" in text


def test_plots_written_and_attached_to_mlflow(
    store_with_runs: dict[str, str], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from sr1.tracking.mlflow_log import tracking_uri

    out = tmp_path / "plots"
    rep = build_report(plots_dir=out, n_boot=50)
    train = store_with_runs["train"]
    names = sorted(Path(p).name for p in rep["plots"])
    assert names == sorted([f"{train}_curves.png", "em_by_dataset.png"])
    for p in rep["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mlid = Store().get_run(train)["mlflow_run_id"]
    arts = [a.path for a in MlflowClient(tracking_uri(None)).list_artifacts(mlid, "plots")]
    assert arts == [f"plots/{train}_curves.png"]
    assert any(a["kind"] == "plot" for a in Store().artifacts(train))


def test_curve_keys_follow_the_trainer_and_other_names(store_with_runs: dict[str, str]) -> None:
    from sr1.report.plots import curves_for_run, pick_key

    curves = curves_for_run(Store(), store_with_runs["train"])
    assert {k: c["key"] for k, c in curves.items()} == {
        "reward": "reward/mean",
        "response_length": "length/response_mean",
        "searches": "search/mean",
    }
    assert curves["searches"]["steps"] == [0, 1, 2] and curves["reward"]["values"][-1] == 0.5
    verl = {"critic/rewards/mean", "critic/rewards/max", "response_length/mean", "env/x"}
    assert pick_key(verl, "reward") == "critic/rewards/mean"
    assert pick_key(verl, "response_length") == "response_length/mean"
    assert pick_key({"my_reward_std", "my_reward_avg"}, "reward") == "my_reward_avg"
    assert pick_key({"loss"}, "searches") is None


def test_cli_report_formats_and_bad_ids(store_with_runs: dict[str, str]) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["report", "eval-a", "eval-b", "--format", "csv", "--n-boot", "100"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith("run_id,label,method,model,metric,nq,hotpotqa,avg")
    res = runner.invoke(
        app, ["report", "--json", "--compare", "eval-a", "eval-b", "--n-boot", "50"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["compare"]["shared_examples"] == 6
    res = runner.invoke(
        app, ["report", "--format", "markdown", "--baseline", "eval-b", "--n-boot", "50"]
    )
    assert "| rag-base | eval-a | 0.500 (-0.250) | 0.500 (-0.500) | 0.500 (-0.375) |" in res.output
    with pytest.raises(NotFoundError, match="eval-a"):  # unknown id lists recent runs
        build_report(["nope"])
    with pytest.raises(Sr1Error, match="ambiguous"):
        build_report(["eval-"])
    with pytest.raises(Sr1Error, match="no eval results"):
        build_report(compare=("eval-a", store_with_runs["train"]))
    with pytest.raises(NotFoundError, match="report format"):
        render(build_report(["eval-a"], n_boot=10), "html")


def test_warns_when_columns_are_not_comparable(sr1_home: Path) -> None:
    store = Store()
    for rid, limit in (("e1", 4), ("e2", 50)):
        store.create_run(rid, "eval")
        rows = _rows("a")[:2]
        store.add_eval_results(rid, rows)
        store.add_eval_summary(rid, "nq", summarize(rows), {"limit": limit}, method="rag")
    rep = build_report(n_boot=10)
    assert rep["warnings"] == ["nq: rows differ in limit; compare with care"]
