"""A reduced `sr1 quickstart` end to end through the CLI: tiny-qwen2, a small synthetic world,
real BM25, real SFT and GRPO steps, real evals, real MLflow and DuckDB stores in a temp home.

The random tiny model learns nothing in two steps, so this checks the pipeline (every stage is
a stored run, the rows come from the stored results, a re-run skips finished stages), not the
learning; `make demo` / benchmarks/quickstart.sh measure that with SmolLM2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1.cli.main import app, main

TINY = [
    "model.name=tiny-qwen2",
    "quickstart.synth_entities=40",
    "quickstart.synth_train=40",
    "quickstart.synth_dev=5",
    "quickstart.synth_test=12",
    "eval.limit=6",
    "eval.max_new_tokens=12",
    "rollout.max_response_length=12",
    "rollout.max_total_response_length=96",
    "rollout.max_obs_length=40",
    "rollout.n_samples=2",
    "trainer.prompts_per_step=2",
    "trainer.mini_batch_size=4",
    "trainer.micro_batch_size=4",
    "trainer.max_steps=2",
    "trainer.save_every=1",
    "trainer.sft_examples=8",
    "trainer.sft_epochs=1",
    "trainer.freeze_layers=1",
]


def _run(args: list[str]) -> dict:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.slow
def test_reduced_quickstart_end_to_end_and_rerun_skips(sr1_home: Path) -> None:
    from sr1.tracking.store import Store

    args = ["quickstart", "--json"] + [a for s in TINY for a in ("--set", s)]
    out = _run(args)
    rows = out["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        ("untrained", "direct"),
        ("untrained", "rag"),
        ("untrained", "search"),
        ("sft", "search"),
        ("sft+rl", "search"),
    ]
    store = Store()
    for r in rows:
        assert r["n"] == 6
        assert 0.0 <= r["em"] <= 1.0
        # the row's EM is the mean of the per-example rows stored for that run
        ex = store.eval_results([r["run_id"]])
        assert len(ex) == 6
        assert sum(e["em"] for e in ex) / 6 == pytest.approx(r["em"])
    kinds = {rid: store.get_run(rid)["kind"] for rid in (out["train_run"], out["sft_run"])}
    assert kinds == {out["train_run"]: "train", out["sft_run"]: "sft"}
    assert store.get_run(out["train_run"])["status"] == "finished"
    assert set(out["seconds"]) >= {"fetch", "synth", "index", "sft", "train", "eval-rl"}
    assert out["mlflow_uri"].startswith("sqlite:///") and Path(out["duckdb"]).is_file()

    again = _run(args)  # everything finished: no stage reruns, the same rows come back
    assert [r["run_id"] for r in again["rows"]] == [r["run_id"] for r in rows]
    assert again["seconds"] == out["seconds"]
    shown = CliRunner().invoke(app, [a for a in args if a != "--json"])  # the rich tables
    assert shown.exit_code == 0, shown.output
    assert "quickstart: synthetic test split" in shown.stdout and "mlflow ui" in shown.stdout
    assert "finished earlier, skipped" in shown.output


def test_quickstart_rejects_unknown_baseline_before_any_work(
    sr1_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["quickstart", "--set", "quickstart.baselines=[direct,magic]"]) == 2
    err = capsys.readouterr().err
    assert "magic" in err and "valid: cot, direct, rag, search" in err
    assert not (sr1_home / "models").exists()  # nothing was fetched
