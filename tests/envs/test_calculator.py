"""The environment interface proven by a second, real tool: the calculator.

The rollout loop is the same one search uses; only the Env differs. The scripted engine (a
fake, see tests/rollout/helpers.py: a random tiny model never writes tags) plays the policy;
the tokenizer, the loop, the calculator and the scorer are real.
"""

from __future__ import annotations

import pytest

from sr1.config import RolloutConfig
from sr1.envs import ENVS, Action, CalculatorEnv, make_env
from sr1.envs.calculator import evaluate
from sr1.errors import NotFoundError
from sr1.models import load_tokenizer
from sr1.rollout.loop import run_rollouts
from tests.rollout.helpers import ScriptedEngine

ROW = {"id": "m1", "question": "What is 6*7?", "golden_answers": ["42"], "prompt": "Q: 6*7?\n"}


@pytest.fixture(scope="module")
def tok(tiny_qwen2: str):
    return load_tokenizer(tiny_qwen2)


def _enc(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]


def test_calculator_outputs_are_masked_and_actions_are_sampled(tok) -> None:
    turn1 = "<think> multiply </think>\n<calculator> 6 * 7 </calculator>"
    turn2 = "<think> done </think>\n<answer> 42 </answer>"
    eng = ScriptedEngine(tok, [_enc(tok, ROW["prompt"])], [[turn1, turn2]])
    cfg = RolloutConfig(max_turns=2)
    (t,) = run_rollouts(eng, CalculatorEnv(), [ROW], cfg, progress=False)
    assert eng.calls[0][2] == ["</calculator>", "</answer>"]  # the env's stop strings
    s1, s2 = _enc(tok, turn1), _enc(tok, turn2)
    obs = _enc(tok, "\n\n<result>") + _enc(tok, "42") + _enc(tok, "</result>\n\n")
    assert t.response_ids == s1 + obs + s2
    assert t.loss_mask == [1] * len(s1) + [0] * len(obs) + [1] * len(s2)
    assert [k for k, _, _ in t.segments] == ["gen", "obs", "gen"]
    assert t.text == turn1 + "\n\n<result>42</result>\n\n" + turn2
    assert t.queries == ["6 * 7"] and t.num_searches == 1
    assert t.answer == "42" and t.reward == 1.0 and t.finish_reason == "answer"


def test_invalid_calculator_turn_gets_its_own_notice(tok) -> None:
    eng = ScriptedEngine(tok, [_enc(tok, ROW["prompt"])], [["<calculator>  </calculator>", "<answer> 1 </answer>"]])  # fmt: skip
    (t,) = run_rollouts(eng, CalculatorEnv(), [ROW], RolloutConfig(max_turns=1), progress=False)
    notice = _enc(tok, CalculatorEnv.invalid_notice)
    a, b = next((a, b) for k, a, b in t.segments if k == "notice")
    assert t.response_ids[a:b] == notice and set(t.loss_mask[a:b]) == {0}
    assert "<calculator> and </calculator>" in CalculatorEnv.invalid_notice


@pytest.mark.parametrize(
    ("expr", "want"),
    [("2 * (3 + 4)", "14"), ("7 / 2", "3.5"), ("2^10", "1024"), ("-3 + 1", "-2"), ("10 // 3", "3")],
)
def test_arithmetic(expr: str, want: str) -> None:
    (o,) = CalculatorEnv().execute([Action("calculator", expr)])
    assert o.text == want


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "open('x')",
        "a + 1",
        "1 / 0",
        "9 ** 9 ** 9",
        "(1,2)",
        "2 ** 1000",
    ],
)
def test_refuses_anything_but_bounded_arithmetic(expr: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expr)
    (o,) = CalculatorEnv().execute([Action("calculator", expr)])
    assert o.text.startswith("error: ")


def test_env_registry_is_loud() -> None:
    assert ENVS.names() == ["calculator", "search"]
    with pytest.raises(NotFoundError, match="valid: calculator, search"):
        make_env("python")
