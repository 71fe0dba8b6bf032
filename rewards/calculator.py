"""task=calculator: arithmetic the model may work out with a calculator tool, over several turns.

    python -c "from rewards.calculator import calculate; print(calculate('23 * (47 - 5) / 2'))"
    python scripts/train.py task=calculator        # the bundled model learns to call the tool

The questions are products of two-digit numbers (by default), which SmolLM2-135M almost never
gets right by itself, and gets right nearly always once it has the calculator's result in its
context. The prompt shows one worked example of the `<tool_call>` convention (a one-shot chat
turn); the model must learn to use it. The reward is 1 when the last integer of the final
answer (the first turn without a tool call) equals the answer, else 0: a call alone earns
nothing, and an episode that runs out of turns or tokens before answering gets 0.

The calculator evaluates an arithmetic expression by walking its syntax tree: numbers, + - *
/ // % ** (^ as a power), unary signs and parentheses. Nothing else (names, calls, attributes,
strings) is accepted, and the size of powers and results is bounded, so no input can run code
or hang the process.
"""

from __future__ import annotations

import ast
import math
import operator

from rewards.arithmetic import QUESTION, last_integer_reward
from rewards.env import Step, ToolEnvironment

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e30

SYSTEM_PROMPT = (
    'You can use a calculator: write <tool_call>{"name": "calculator", "arguments": {"expression": "..."}}'
    "</tool_call> and the result comes back. Then answer with only the number."
)
_EXAMPLE_QUESTION = QUESTION.format(a=36, op="*", b=58)
_EXAMPLE_CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "36 * 58"}}</tool_call>'

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as text (integers without a decimal point).

    Raises ValueError (with a message meant for the model) for anything that is not plain
    arithmetic, and ZeroDivisionError for a division by zero.
    """
    if not isinstance(expression, str):
        raise ValueError(f"the expression must be a string, not {type(expression).__name__}")
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**").replace(",", "")
    if not text:
        raise ValueError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r} as arithmetic") from None
    value = _eval(tree.body)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the result is not a finite number")
        if value.is_integer():
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"powers are limited to exponents of at most {MAX_EXPONENT}")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
            raise ValueError("the result is too large" if not isinstance(value, complex) else "the result is not real")
        return value
    raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.unparse(node)!r}")


class CalculatorEnv(ToolEnvironment):
    """One tool, `calculator(expression)`; the final answer is scored by its last integer.

    few_shot: start the conversation with one worked example (question, tool call, result,
    answer) after the system prompt: without it SmolLM2-135M writes the call format almost
    never, with it about one sample in six on the first turn.
    """

    def __init__(self, system_prompt: str = SYSTEM_PROMPT, few_shot: bool = True, max_calls_per_turn: int = 4) -> None:
        super().__init__({"calculator": calculate}, max_calls_per_turn=max_calls_per_turn)
        self.system_prompt = system_prompt
        self.few_shot = few_shot
        self.expected = ""

    def reset(self, row: dict) -> list[dict]:
        self.expected = str(row["answer"])
        messages = [{"role": "system", "content": self.system_prompt}]
        if self.few_shot:
            messages += [
                {"role": "user", "content": _EXAMPLE_QUESTION},
                {"role": "assistant", "content": _EXAMPLE_CALL},
                {"role": "tool", "content": calculate("36 * 58")},
                {"role": "assistant", "content": calculate("36 * 58")},
            ]
        return messages + [{"role": "user", "content": row["question"]}]

    def answer(self, text: str) -> Step:
        return Step(None, last_integer_reward(text, self.expected), True)
