"""A calculator tool environment for multi-step arithmetic and GSM8K.

The model may call ``calculate(expression)`` any number of turns (within env.max_turns); its
first reply without a tool call is the answer, rewarded 1.0 when its last number equals the
item's answer column (GSM8K's ``#### 42`` read first when present), else 0.0.

Expressions are evaluated by walking Python's AST over numbers and + - * / // % ** and unary
signs only (never eval()); exponents and intermediate sizes are bounded so no call runs long.
"""

from __future__ import annotations

import ast
import operator
from decimal import Decimal
from typing import Any

from rewards.answers import gsm8k_answer, last_number, parse_number
from rollouts.env.tools import ToolEnv

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30
MAX_LENGTH = 200


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ValueError on anything else.

    >>> evaluate("2 + 3 * (4 - 1)")
    11
    >>> evaluate("7 / 2")
    3.5
    """
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_eval(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
        value = _BINARY[type(node.op)](left, right)  # ZeroDivisionError reaches the model as an error
    else:
        raise ValueError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")
    if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
        raise ValueError("the result is out of range")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: the expression, e.g. "(12 + 7) * 3"
    """
    value = evaluate(expression)
    return str(round(value, 10) if isinstance(value, float) else value)


class CalculatorEnv(ToolEnv):
    tools = (calculate,)

    def __init__(self, answer_column: str = "answer") -> None:
        super().__init__()
        self.answer_column = answer_column

    def score(self, answer: str, item: dict[str, Any]) -> float | None:
        if self.answer_column not in item:
            raise KeyError(f"env calculator: the item has no column {self.answer_column!r} "
                           f"(it has {sorted(item)}); set env.kwargs.answer_column")
        written = str(item[self.answer_column])
        reference = parse_number(gsm8k_answer(written) or written)
        if reference is None:
            return None  # an unscoreable reference: counted as a None reward, never as 0
        said = gsm8k_answer(answer) or last_number(answer)
        got = parse_number(said) if said is not None else None
        return float(got is not None and Decimal(got) == reference)
