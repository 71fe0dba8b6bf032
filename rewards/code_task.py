"""A small built-in code task: write one short Python function, scored by hidden tests in the sandbox.

    python -c "from rewards.code_task import make_code_splits; print(make_code_splits(0, 3)[1][0].question)"
    python -m pytest tests/unit/test_sandbox.py -q -k exec_reward

Each Problem's `answer` is its hidden test code: asserts written with `_same(got, want)`,
which also requires equal types all the way down, so an object whose __eq__ always says True
does not pass. The program run is: the response's code, the harness, the tests, then a line
printing a fresh random token; the reward is 1.0 only when it exits 0 AND printed the
token, so `sys.exit(0)` or `os._exit(0)` before the tests scores 0.0. This stops accidental
reward hacks, not a policy that reads its own program file to find the token.
"""

from __future__ import annotations

import random
import secrets

from rewards.arithmetic import Problem
from rewards.sandbox import SandboxResult, run_python

SANDBOX_TIMEOUT_S = 5.0  # per response; a RewardPool around this wants timeout_s >= 7 (start-up + cleanup)
_ASK = "{task}\nAnswer with the complete function in a ```python code block."

# (what to write, hidden tests)
_PROBLEMS = [
    ("Write a Python function `add(a, b)` that returns the sum of the integers a and b.",
     "assert _same(add(2, 3), 5)\nassert _same(add(-4, 4), 0)\nassert _same(add(0, 0), 0)\n"
     "assert _same(add(123, 877), 1000)"),
    ("Write a Python function `is_palindrome(s)` that returns True if the string s reads the same forwards and "
     "backwards (comparing characters exactly), else False.",
     "assert _same(is_palindrome('racecar'), True)\nassert _same(is_palindrome('ab'), False)\n"
     "assert _same(is_palindrome(''), True)\nassert _same(is_palindrome('Aa'), False)"),
    ("Write a Python function `fizzbuzz(n)` that returns a list of strings for the numbers 1 to n: 'Fizz' for "
     "multiples of 3, 'Buzz' for multiples of 5, 'FizzBuzz' for multiples of both, else the number as a string.",
     "assert _same(fizzbuzz(5), ['1', '2', 'Fizz', '4', 'Buzz'])\nassert _same(fizzbuzz(15)[-1], 'FizzBuzz')\n"
     "assert _same(fizzbuzz(0), [])"),
    ("Write a Python function `factorial(n)` that returns n! for an integer n >= 0.",
     "assert _same(factorial(0), 1)\nassert _same(factorial(1), 1)\nassert _same(factorial(5), 120)\n"
     "assert _same(factorial(12), 479001600)"),
    ("Write a Python function `fibonacci(n)` that returns the n-th Fibonacci number, with fibonacci(0) == 0 and "
     "fibonacci(1) == 1.",
     "assert _same(fibonacci(0), 0)\nassert _same(fibonacci(1), 1)\nassert _same(fibonacci(10), 55)\n"
     "assert _same(fibonacci(30), 832040)"),
    ("Write a Python function `reverse_words(s)` that returns the words of the string s (split on whitespace) in "
     "reverse order, joined by single spaces.",
     "assert _same(reverse_words('hello world'), 'world hello')\nassert _same(reverse_words('  a  b c '), 'c b a')\n"
     "assert _same(reverse_words(''), '')"),
    ("Write a Python function `count_vowels(s)` that returns how many characters of the string s are vowels "
     "(a, e, i, o, u, upper or lower case).",
     "assert _same(count_vowels('hello'), 2)\nassert _same(count_vowels('AEIOUxyz'), 5)\n"
     "assert _same(count_vowels(''), 0)"),
    ("Write a Python function `running_sum(xs)` that returns the list of prefix sums of the list of integers xs.",
     "assert _same(running_sum([1, 2, 3, 4]), [1, 3, 6, 10])\nassert _same(running_sum([]), [])\n"
     "assert _same(running_sum([5, -5]), [5, 0])"),
    ("Write a Python function `is_prime(n)` that returns True if the integer n is a prime number, else False.",
     "assert _same(is_prime(2), True)\nassert _same(is_prime(1), False)\nassert _same(is_prime(0), False)\n"
     "assert _same(is_prime(97), True)\nassert _same(is_prime(91), False)\nassert _same(is_prime(-7), False)"),
    ("Write a Python function `flatten(xss)` that takes a list of lists and returns one list with all their "
     "elements in order.",
     "assert _same(flatten([[1, 2], [3], []]), [1, 2, 3])\nassert _same(flatten([]), [])\n"
     "assert _same(flatten([['a'], ['b', 'c']]), ['a', 'b', 'c'])"),
    ("Write a Python function `char_count(s)` that returns a dict mapping each character of the string s to the "
     "number of times it occurs.",
     "assert _same(char_count('banana'), {'b': 1, 'a': 3, 'n': 2})\nassert _same(char_count(''), {})"),
    ("Write a Python function `gcd(a, b)` that returns the greatest common divisor of the non-negative integers "
     "a and b, with gcd(0, 0) == 0.",
     "assert _same(gcd(12, 18), 6)\nassert _same(gcd(7, 5), 1)\nassert _same(gcd(0, 9), 9)\n"
     "assert _same(gcd(0, 0), 0)"),
]

_HARNESS = '''
def _same(got, want):
    if type(got) is not type(want):
        return False
    if isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return got == want
'''


def make_code_splits(seed: int, num_eval: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval): the problems shuffled with `seed`, the first num_eval for eval."""
    if not 0 <= num_eval < len(_PROBLEMS):
        raise ValueError(f"task.num_eval={num_eval} must be in [0, {len(_PROBLEMS) - 1}]: the code task has "
                         f"{len(_PROBLEMS)} problems and training needs at least one")
    problems = [Problem(_ASK.format(task=task), tests) for task, tests in _PROBLEMS]
    random.Random(seed).shuffle(problems)
    return problems[num_eval:], problems[:num_eval]


def python_exec_reward(response: str, answer: str) -> float:
    """1.0 if the response's code passes the hidden tests in `answer` (in the sandbox), else 0.0."""
    passed, _ = run_tests(response, answer)
    return 1.0 if passed else 0.0


def run_tests(response: str, tests: str, timeout_s: float = SANDBOX_TIMEOUT_S) -> tuple[bool, SandboxResult]:
    """Run the response's code and then `tests` in the sandbox: (passed, the run's result)."""
    token = secrets.token_hex(16)
    program = "\n\n".join([extract_code(response), _HARNESS, tests, f"print({token!r})\n"])
    result = run_python(program, timeout_s=timeout_s)
    return result.returncode == 0 and token in result.stdout, result


def extract_code(response: str) -> str:
    """The ```python (or ```py) fenced blocks of `response`, joined; else its unlabelled blocks; else all of it.

    A block left open at the end (the response hit its token limit) counts up to the end.
    """
    blocks: dict[str, list[str]] = {"python": [], "": []}
    label, lines = None, []
    for line in response.splitlines():
        if line.lstrip().startswith("```"):
            if label is None:  # opening fence
                label, lines = line.strip().strip("`").strip().lower(), []
            else:
                blocks.setdefault(_kind(label), []).append("\n".join(lines))
                label = None
        elif label is not None:
            lines.append(line)
    if label is not None:
        blocks.setdefault(_kind(label), []).append("\n".join(lines))
    return "\n\n".join(blocks["python"] or blocks[""]) or response


def _kind(label: str) -> str:
    return "python" if label in ("python", "python3", "py") else label
