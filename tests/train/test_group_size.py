"""`sr1 train --algo grpo|rloo` without a group size uses the paper's (5 samples per prompt);
an explicit ``rollout.n_samples=1`` (``--set`` or YAML) stays an error, raised before any run
is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1.cli.main import app, main
from sr1.tracking.store import Store

SMALL = [
    "data.train_datasets=[synth]", "data.search_prompt=search_short", "retrieval.index=synth",
    "rollout.max_turns=1", "rollout.max_response_length=8", "rollout.max_total_response_length=32",
    "rollout.max_obs_length=16", "trainer.prompts_per_step=1", "trainer.mini_batch_size=5",
    "trainer.micro_batch_size=5", "trainer.save_every=1",
]  # fmt: skip


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _no_run_recorded(home: Path) -> None:
    assert Store().list_runs("train") == []
    runs = home / "runs"
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_explicit_group_size_of_one_is_refused(
    algo: str, tmp_path: Path, sr1_home: Path, capsys
) -> None:
    args = ["train", "--algo", algo, "--model", "tiny-qwen2", "--max-steps", "1"]
    assert main([*args, "--set", "rollout.n_samples=1"]) == 2
    err = capsys.readouterr().err
    assert f"{algo} compares samples" in err and "rollout.n_samples is 1" in err
    assert "Traceback" not in err
    yaml = tmp_path / "one.yaml"
    yaml.write_text("rollout:\n  n_samples: 1\n", encoding="utf-8")
    assert main([*args, "--config", str(yaml)]) == 2
    assert "rollout.n_samples is 1" in capsys.readouterr().err
    _no_run_recorded(sr1_home)
    assert not (sr1_home / "models" / "tiny-qwen2").exists()  # refused before loading anything


@pytest.mark.slow
def test_grpo_without_group_size_uses_five(tiny_qwen2: str, sr1_home: Path) -> None:
    import torch

    torch.set_num_threads(1)
    runner = CliRunner()
    for args in (
        ["data", "synth", "--n-entities", "30", "--n-train", "4", "--n-test", "2", "--json"],
        ["index", "build", "synth", "--json"],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    args = ["train", "--algo", "grpo", "--model", tiny_qwen2, "--max-steps", "1", "--json"]
    res = runner.invoke(app, [*args, *_sets(SMALL)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "using the paper's group size 5" in res.stderr
    doc = json.loads(res.stdout)
    run = Store().get_run(doc["run_id"])
    assert run["params"]["group_size"] == 5
    assert run["config"]["rollout"]["n_samples"] == 5  # the resolved value is what is recorded
