"""Math answer reward by math-verify (rewards/math.py)."""

import json
import threading
from pathlib import Path

import pytest

from rewards.math import math_reward, reference_answer

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("response,answer", [
    ("\\boxed{0.5}", "1/2"),
    ("The answer is 12.", "12"),             # the full stop is not a decimal point
    ("$\\frac{3}{4}$", "0.75"),
    ("5 + 3 = 8", "8"),                      # no anchor: the last number
    ("The answer is 8. Check: 5 + 3 = 8, and 10 apples.", "8"),  # "answer is" beats a later number
    ("I got 7 first, but \\boxed{9} is right. Then 11.", "9"),   # \boxed beats everything
    ("The library has $1,370$ books.", "1370"),
    ("It costs $7.50", "7.5"),
    ("Answer: 72 dollars", "72"),
    ("\\boxed{2^{10}}", "1024"),
    ("\\boxed{5!}", "120"),
])
def test_equivalent_answers_score_one(response, answer):
    assert math_reward(response, answer) == 1.0


@pytest.mark.parametrize("response,answer", [
    ("The answer is 13.", "12"),
    ("\\boxed{8}. Actually it is 9.", "9"),  # the boxed answer is the one graded
    ("0.33", "1/3"),                         # equal to 6 decimals only
    ("$x^2$", "4"),
    ("twelve", "12"),                        # words are not numbers
])
def test_different_answers_score_zero(response, answer):
    assert math_reward(response, answer) == 0.0


@pytest.mark.parametrize("answer,final", [
    ("#### 72", "72"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("No marker here: 5", "No marker here: 5"),
    ("a #### b #### 1,370 ", "1,370"),      # the last marker counts
])
def test_reference_answer_takes_what_follows_the_last_marker(answer, final):
    assert reference_answer(answer) == final


def test_gsm8k_references():
    answer = "He makes 45+27=<<45+27=72>>72 muffins.\nAfter selling 60, 72-60=<<72-60=12>>12 are left.\n#### 12"
    assert math_reward("So 12 muffins are left.", answer) == 1.0
    assert math_reward("So 72 muffins are left.", answer) == 0.0  # 72 appears in the reasoning, not after ####
    assert math_reward("The answer is 1370.", "#### 1,370") == 1.0


def test_shipped_gsm8k_mini_answers_verify():
    rows = [json.loads(line) for line in (REPO / "rewards/data/gsm8k_mini.jsonl").read_text().splitlines()]
    for row in rows:
        final = reference_answer(row["answer"])
        assert math_reward(f"The answer is {final}.", row["answer"]) == 1.0, row
        assert math_reward(f"The answer is {int(final) + 1}.", row["answer"]) == 0.0, row


@pytest.mark.parametrize("response,answer", [
    ("", "12"), ("   ", "12"), ("hello world", "12"), ("{}}}\\boxed{", "12"), ("\\boxed{1/0}", "1"),
    ("\x00\xff garbage $$ \\frac{", "1"), ("12", ""), ("12", "not a number"), (None, "12"), ("12", None),
    ("\\boxed{10^{10^{10}}}", "7"),          # would take sympy forever to build; refused
    ("\\boxed{9^{9^{9^{9}}}}", "7"),
    ("\\boxed{(10^{9})!}", "7"),
    ("\\boxed{\\sum_{i=1}^{10^{10}} i}", "7"),  # unevaluated sums are not final answers
])
def test_garbage_scores_zero_and_never_raises(response, answer):
    assert math_reward(response, answer) == 0.0


def test_same_rewards_off_the_main_thread():
    # math-verify's SIGALRM timeout only works in the main thread; elsewhere it runs without one
    cases = [("\\boxed{0.5}", "1/2"), ("13", "#### 12"), ("\\boxed{10^{10^{10}}}", "7"), ("5 + 3 = 8", "8")]
    results = []
    thread = threading.Thread(target=lambda: results.extend(math_reward(r, a) for r, a in cases))
    thread.start()
    thread.join(timeout=30)
    assert results == [math_reward(r, a) for r, a in cases] == [1.0, 0.0, 0.0, 1.0]
