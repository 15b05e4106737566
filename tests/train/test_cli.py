"""`sr1 sft` and `sr1 train` through the CLI on a small synthetic world (real index, stores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sr1.cli.main import app, main

SETS = [
    "data.train_datasets=[synth]", "data.search_prompt=search_short", "retrieval.index=synth",
    "rollout.n_samples=2", "rollout.max_turns=1", "rollout.max_response_length=8",
    "rollout.max_total_response_length=64", "rollout.max_obs_length=32",
    "trainer.prompts_per_step=2", "trainer.mini_batch_size=4", "trainer.micro_batch_size=4",
    "trainer.sft_examples=4", "trainer.sft_epochs=1", "trainer.save_every=1",
]  # fmt: skip


def _json(args: list[str]) -> dict:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.slow
def test_sft_then_train_then_resume_through_the_cli(tiny_qwen2: str, sr1_home: Path) -> None:
    sets = [a for s in SETS for a in ("--set", s)]
    _json(["data", "synth", "--n-entities", "40", "--n-train", "20", "--n-test", "5", "--json"])
    _json(["index", "build", "synth", "--json"])
    warm = _json(["sft", "--model", tiny_qwen2, "--index", "synth", "--json", *sets])
    assert warm["n_examples"] == 4 and Path(warm["checkpoint"], "config.json").is_file()
    args = ["train", "--algo", "grpo", "--model", warm["checkpoint"], "--max-steps", "1"]
    res = _json([*args, "--json", *sets])
    assert len(res["steps"]) == 1 and "reward/mean" in res["steps"][0]
    saved = (sr1_home / "runs" / res["run_id"] / "config.yaml").read_text()
    assert "search_short" in saved  # the resolved config is saved with the run
    more = _json(["train", "--resume", res["run_id"], "--max-steps", "2", "--json"])
    assert [s["step"] for s in more["steps"]] == [2]


def test_train_rejects_unknown_algo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--algo", "dpo", "--model", "tiny-qwen2"]) == 2
    err = capsys.readouterr().err
    assert "dpo" in err and "grpo" in err
