"""The built-in arithmetic task and its reward."""

import pytest

from rewards.arithmetic import last_integer_reward, make_splits


def test_splits_are_disjoint_and_seeded():
    train, eval_ = make_splits(seed=1, num_train=300, num_eval=50, max_operand=20, ops="+-")
    assert len(train) == 300 and len(eval_) == 50
    assert not {p.question for p in train} & {p.question for p in eval_}
    assert make_splits(1, 300, 50, 20, "+-") == (train, eval_)
    assert make_splits(2, 300, 50, 20, "+-") != (train, eval_)


def test_answers_are_right():
    train, _ = make_splits(seed=0, num_train=20, num_eval=1, max_operand=9, ops="*")
    for p in train:
        a, b = (int(x) for x in p.question.removeprefix("What is ").split("?")[0].split(" * "))
        assert p.answer == str(a * b)


def test_too_many_questions_is_a_clear_error():
    with pytest.raises(ValueError, match="max_operand"):
        make_splits(seed=0, num_train=100, num_eval=10, max_operand=5, ops="+")


@pytest.mark.parametrize("response,answer,reward", [
    ("12", "12", 1.0),
    ("7 + 5 = 12", "12", 1.0),  # the last integer counts
    ("12\n\nThis is because 7 + 5 is 12.", "12", 1.0),
    ("12. Also 13", "12", 0.0),  # kept talking: the last integer is 13
    ("3 - 5 = -2", "-2", 1.0),
    ("1,000", "1000", 1.0),
    ("no number", "3", 0.0),
    ("", "3", 0.0),
])
def test_last_integer_reward(response, answer, reward):
    assert last_integer_reward(response, answer) == reward


def test_text_hash_reward_is_fixed_by_the_text_and_spread_over_0_1():
    from rewards.text_hash import text_hash_reward

    assert text_hash_reward("abc", "1") == text_hash_reward("abc", "2")  # the answer is ignored
    rewards = [text_hash_reward(f"response {i}", "") for i in range(1000)]
    assert all(0 <= r < 1 for r in rewards) and len(set(rewards)) == 1000
    assert 0.45 < sum(rewards) / len(rewards) < 0.55  # uniform-looking: mean ~ 0.5


def test_overlong_penalty_is_linear_over_the_buffer():
    from rewards.shaping import overlong_penalty

    # L_max = 100, buffer 20: no penalty up to 80 tokens, then linear to -factor at 100
    assert overlong_penalty(80, 100, 20, 1.0) == 0.0
    assert overlong_penalty(90, 100, 20, 1.0) == -0.5
    assert overlong_penalty(100, 100, 20, 2.0) == -2.0
    assert overlong_penalty(100, 100, 0, 1.0) == 0.0  # off
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(10, 100, 100, 1.0)
