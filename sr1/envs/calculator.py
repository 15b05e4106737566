"""A second tool, proving the environment interface: ``<calculator> 2 * (3 + 4) </calculator>``.

The expression is evaluated by walking its Python AST with only numbers, ``+ - * / // % **``
and unary signs allowed (no names, calls or attributes), exponents and results bounded, so a
policy cannot run code or hang the trainer. The observation is ``<result>14</result>`` (mask 0,
like retrieved passages); an expression it refuses reads ``error: …`` inside the tags.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Sequence
from typing import Any

from sr1.envs.base import Action, Env, Observation

_BIN = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UN = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPR_CHARS = 200
MAX_EXPONENT = 64
MAX_ABS = 1e18


def evaluate(expr: str) -> float | int:
    """The value of an arithmetic expression; ValueError for anything else."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr.replace("^", "**"), mode="eval")
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None

    def ev(n: ast.AST) -> float | int:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return n.value
        if isinstance(n, ast.UnaryOp) and type(n.op) in _UN:
            return _UN[type(n.op)](ev(n.operand))
        if isinstance(n, ast.BinOp) and type(n.op) in _BIN:
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.Pow) and abs(b) > MAX_EXPONENT:
                raise ValueError(f"exponent above {MAX_EXPONENT}")
            try:
                v = _BIN[type(n.op)](a, b)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            except OverflowError:
                raise ValueError("result out of range") from None
            if isinstance(v, complex) or abs(v) > MAX_ABS:
                raise ValueError("result out of range")
            return v
        raise ValueError("only numbers and + - * / // % ** are allowed")

    return ev(tree)


def render(value: float | int) -> str:
    """Integers as integers, floats to 10 significant digits."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"


class CalculatorEnv(Env):
    """Arithmetic as a tool; observations between ``<result>`` tags."""

    name = "calculator"
    tag = "calculator"
    obs_open = "<result>"
    obs_close = "</result>"
    invalid_notice = (
        "\nMy previous action is invalid. If I want to calculate, I should put the expression "
        "between <calculator> and </calculator>. If I want to give the final answer, I should "
        "put the answer between <answer> and </answer>. Let me try again.\n"
    )

    def execute(self, actions: Sequence[Action]) -> list[Observation]:
        out = []
        for a in actions:
            try:
                text = render(evaluate(a.content))
            except ValueError as e:
                text = f"error: {e}"
            out.append(Observation(text=text, info={"query": a.content}))
        return out

    def describe(self) -> dict[str, Any]:
        return {"env": self.name}
