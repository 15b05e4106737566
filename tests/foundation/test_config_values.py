"""Every invalid config value is refused when the config is resolved: exit 2, one `error:` line
naming the key and its valid range, and no run recorded. Through the real CLI entry point
(``sr1.cli.main.main``) with a real DuckDB store in the test's SR1_HOME."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sr1 import config as C
from sr1.cli.main import main
from sr1.errors import ConfigError

TRAIN = ["train", "--algo", "grpo", "--model", "tiny-qwen2"]
EVAL = ["eval", "-d", "nq", "--model", "tiny-qwen2"]

# (argv, words the error must contain)
BAD = [
    (TRAIN + ["--set", "rollout.topk=0"], "rollout.topk=0"),
    (TRAIN + ["--set", "rollout.topk=-2"], "rollout.topk=-2"),
    (TRAIN + ["--set", "rollout.temperature=-0.5"], "rollout.temperature"),
    (TRAIN + ["--set", "rollout.max_turns=1000000"], "rollout.max_turns"),
    (TRAIN + ["--set", "trainer.save_every=0"], "trainer.save_every=0"),
    (TRAIN + ["--set", "tracking.log_every=0"], "tracking.log_every=0"),
    (TRAIN + ["--set", "trainer.lr=0"], "trainer.lr"),
    (TRAIN + ["--set", "trainer.lr=-1e-5"], "trainer.lr"),
    (TRAIN + ["--set", "trainer.lr=nan"], "finite"),
    (TRAIN + ["--set", "trainer.lr=.inf"], "finite"),
    (TRAIN + ["--set", "trainer.prompts_per_step=0"], "trainer.prompts_per_step=0"),
    (TRAIN + ["--set", "trainer.ppo_epochs=0"], "trainer.ppo_epochs=0"),
    (TRAIN + ["--set", "rollout.max_response_length=0"], "rollout.max_response_length=0"),
    (TRAIN + ["--set", "model.device=gpu7"], "model.device='gpu7'"),
    (TRAIN + ["--set", "rollout.engine=sglang"], "hf, vllm"),
    (TRAIN + ["--set", "rollout.env=python"], "calculator, search"),
    (TRAIN + ["--set", "algorithm.kl_estimator=k9"], "algorithm.kl_estimator"),
    (TRAIN + ["--set", "algorithm.reward=bleu"], "em, f1, format"),
    (TRAIN + ["--set", "rollout.top_p=0"], "rollout.top_p"),
    (TRAIN + ["--set", "trainer.mixed_precision=fp8"], "auto, no, bf16"),
    (TRAIN + ["--set", "model.dtype=int4"], "model.dtype"),
    (TRAIN + ["--max-steps", "0"], "--max-steps=0"),
    (TRAIN + ["--max-steps", "-3"], "--max-steps=-3"),
    (["train", "--algo", "dpo", "--model", "tiny-qwen2"], "dpo"),
    (EVAL + ["--limit", "0"], "--limit=0"),
    (EVAL + ["--limit", "-1"], "--limit=-1"),
    (EVAL + ["--engine", "sglang"], "hf, vllm"),
    (EVAL + ["--method", "ircot"], "ircot"),
    (EVAL + ["--set", "eval.batch_size=0"], "eval.batch_size=0"),
    (EVAL + ["--set", "eval.temperature=-1"], "eval.temperature"),
    (EVAL + ["--set", "eval.answer_fallback=guess"], "none, response"),
    (
        ["rollout", "--model", "tiny-qwen2", "--limit", "0", "--dataset", "nq", "--index", "x"],
        "--limit=0",
    ),
    (["sft", "--model", "tiny-qwen2", "--index", "x", "--max-steps", "0"], "--max-steps=0"),
]


@pytest.mark.parametrize(("argv", "words"), BAD, ids=[" ".join(a[3:]) for a, _ in BAD])
def test_invalid_value_is_one_error_line_exit_2_and_no_run(argv, words, capsys) -> None:
    from sr1.tracking.store import Store

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert sum(ln.startswith("error:") for ln in lines) == 1, err
    assert "Traceback" not in err and words in err, err
    assert Store().list_runs() == []


def test_every_default_is_valid_and_every_field_has_help() -> None:
    for f in dataclasses.fields(C.ExperimentConfig):
        cls = f.default_factory  # type: ignore[misc]
        assert C.validate_defaults(cls) == []
        for g in dataclasses.fields(cls):
            assert g.metadata.get("help"), f"{f.name}.{g.name} has no help text"


def test_ranges_hold_in_code_too() -> None:
    # dataclasses.replace runs the same checks as YAML and --set
    with pytest.raises(ConfigError, match=r"rollout.topk=0: must be >= 1"):
        dataclasses.replace(C.RolloutConfig(), topk=0)
    with pytest.raises(ConfigError, match="finite"):
        C.TrainerConfig(lr=math.nan)
    assert C.RolloutConfig(topk=5).topk == 5  # in range is fine
    assert C.ModelConfig(device="cuda:3").device == "cuda:3"


def test_valid_ranges_are_in_the_help_table() -> None:
    rows = {k: h for k, _, h in C.help_table()}
    assert "rollout.topk" in rows
    assert (
        C.valid_range(next(f for f in dataclasses.fields(C.RolloutConfig) if f.name == "topk"))
        == ">= 1 and <= 100"
    )
    assert "[valid: >= 1 and <= 100]" in rows["rollout.topk"]
