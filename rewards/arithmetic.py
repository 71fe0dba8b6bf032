"""The built-in verifiable task: integer arithmetic questions generated from a seed.

Every (a, op, b) with operands in [1, max_operand] is enumerated, shuffled with the task
seed and cut into disjoint eval and train splits, so eval questions are never trained on.
The reward is 1.0 when the last integer in the response equals the answer, else 0.0:
the untrained SmolLM2-135M-Instruct often answers right but then keeps talking (and its
last number is then something else), so both accuracy and stopping are learnable.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INT = re.compile(r"-?\d+")
QUESTION = "What is {a} {op} {b}? Answer with only the number."


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str


def make_splits(seed: int, num_train: int, num_eval: int, max_operand: int, ops: str,
                min_operand: int = 1) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems with operands in [min_operand, max_operand]; raises ValueError when
    the space is too small for both."""
    space = [
        (a, op, b)
        for op in ops
        for a, b in itertools.product(range(min_operand, max_operand + 1), repeat=2)
    ]
    if num_train + num_eval > len(space):
        raise ValueError(
            f"task.num_train + task.num_eval = {num_train + num_eval} exceeds the {len(space)} distinct "
            f"questions with task.min_operand={min_operand}, task.max_operand={max_operand} and task.ops={ops!r}; "
            "widen the operand range or lower the counts"
        )
    random.Random(seed).shuffle(space)
    problems = [Problem(QUESTION.format(a=a, op=op, b=b), str(_OPS[op](a, b))) for a, op, b in space]
    return problems[num_eval : num_eval + num_train], problems[:num_eval]


def last_integer_reward(response: str, answer: str) -> float:
    """1.0 if the last integer in `response` equals `answer`, else 0.0."""
    found = _INT.findall(response.replace(",", ""))
    return 1.0 if found and found[-1].lstrip("+") == answer else 0.0
