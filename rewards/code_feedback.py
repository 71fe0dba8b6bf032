"""task=code_feedback: write a function, see the failing tests' output, try again.

    python scripts/train.py task=code_feedback rollout.max_new_tokens=192 rollout.max_episode_tokens=768

The problems are those of task=python_exec (rewards/code_task.py). Each answer's code runs with
the hidden tests in the sandbox (rewards/sandbox.py). When they pass, the episode ends with
reward 1. Otherwise the model gets the run's error output (the failing assert and its
traceback, or the exception its code raised) as a user message and writes the function again,
up to `max_attempts` answers in all; the reward is that of the last attempt (1 if it passed,
else 0).
"""

from __future__ import annotations

import re

from rewards.code_task import SANDBOX_TIMEOUT_S, run_tests
from rewards.env import Environment, Step

_PATH = re.compile(r'File "[^"]*main\.py"')
RETRY = "The tests failed:\n{output}\nFix the function and answer with the complete function in a ```python code block."


class CodeFeedbackEnv(Environment):
    """max_attempts: answers the model may give (1 = task=python_exec's single answer);
    feedback_chars: how much of the failing run's output (its end) the model is shown."""

    def __init__(self, max_attempts: int = 3, feedback_chars: int = 600, timeout_s: float = SANDBOX_TIMEOUT_S) -> None:
        if max_attempts < 1:
            raise ValueError(f"env.max_attempts={max_attempts} must be >= 1")
        self.max_attempts = max_attempts
        self.feedback_chars = feedback_chars
        self.timeout_s = timeout_s
        self.tests = ""
        self.attempts = 0

    def reset(self, row: dict) -> str:
        self.tests, self.attempts = row["answer"], 0
        return row["question"]

    def step(self, text: str) -> Step:
        self.attempts += 1
        passed, result = run_tests(text, self.tests, self.timeout_s)
        if passed:
            return Step(None, 1.0, True)
        if self.attempts >= self.max_attempts:
            return Step(None, 0.0, True)
        return Step({"role": "user", "content": RETRY.format(output=self.feedback(result))}, 0.0, False)

    def feedback(self, result) -> str:
        if result.timed_out:
            return f"the program did not finish within {self.timeout_s:g} s"
        output = _PATH.sub('File "main.py"', (result.stdout + result.stderr).strip())
        if result.killed_reason and not output:
            return f"the program was stopped ({result.killed_reason})"
        return output[-self.feedback_chars:] if output else f"the program exited with code {result.returncode}"
