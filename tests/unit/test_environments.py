"""The tool-call convention (parsing, malformed calls), the calculator and the built-in environments."""

import pytest

from rewards.calculator import CalculatorEnv, calculate
from rewards.code_feedback import CodeFeedbackEnv
from rewards.env import BadCall, Step, ToolCall, ToolEnvironment, parse_tool_calls

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "23 * 47"}}</tool_call>'


# ---- parsing -------------------------------------------------------------------------
def test_well_formed_call_with_text_around_it():
    assert parse_tool_calls(f"Let me compute.\n{CALL}") == [ToolCall("calculator", {"expression": "23 * 47"})]
    assert parse_tool_calls(f"{CALL} then more words") == [ToolCall("calculator", {"expression": "23 * 47"})]


def test_no_call_is_an_empty_list():
    assert parse_tool_calls("The answer is 1081.") == []
    assert parse_tool_calls("") == []


def test_several_calls_in_order():
    two = CALL + '\n<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    assert [c.arguments["expression"] for c in parse_tool_calls(two)] == ["23 * 47", "1+1"]


@pytest.mark.parametrize("body,alias", [
    ('{"name": "f", "arguments": "{\\"x\\": 1}"}', "OpenAI-style arguments as a JSON string"),
    ('{"name": "f", "parameters": {"x": 1}}', "Llama-style parameters"),
])
def test_argument_variants(body, alias):
    assert parse_tool_calls(f"<tool_call>{body}</tool_call>") == [ToolCall("f", {"x": 1})], alias


def test_call_without_arguments():
    assert parse_tool_calls('<tool_call>{"name": "now"}</tool_call>') == [ToolCall("now", {})]


@pytest.mark.parametrize("text,says", [
    ("<tool_call>{name: calculator}</tool_call>", "not valid JSON"),
    ('<tool_call>["calculator"]</tool_call>', "must be a JSON object, not list"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'has no "name"'),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "must be a JSON object, not list"),
    ('<tool_call>{"name": "f", "arguments": "x=1"}</tool_call>', "string that is not JSON"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "2*', "not closed"),  # cut at the token limit
    (CALL + "<tool_call>{", "not closed"),
])
def test_malformed_calls_are_bad_calls_not_exceptions(text, says):
    calls = parse_tool_calls(text)
    assert isinstance(calls[-1], BadCall) and says in calls[-1].error, calls


# ---- the tool environment -------------------------------------------------------------
class _Echo(ToolEnvironment):
    def __init__(self):
        super().__init__({"echo": lambda text: text, "boom": self._boom}, max_calls_per_turn=2)

    @staticmethod
    def _boom():
        raise KeyError("inside the tool")

    def reset(self, row):
        return row["question"]

    def answer(self, text):
        return Step(None, 1.0 if "yes" in text else 0.0, True)


def _call(name, **args):
    import json

    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


def test_tool_step_runs_the_call_and_counts():
    step = _Echo().step(_call("echo", text="hi"))
    assert step == Step("hi", 0.0, False, {"tool_calls": 1, "tool_errors": 0})


@pytest.mark.parametrize("turn,says", [
    (_call("nope"), "there is no tool 'nope'; the tools are boom, echo"),
    (_call("echo", txt="hi"), "bad arguments for echo"),
    (_call("boom"), "error: KeyError: 'inside the tool'"),
    ("<tool_call>not json</tool_call>", "error: the tool call is not valid JSON"),
])
def test_tool_errors_become_observations(turn, says):
    step = _Echo().step(turn)
    assert not step.done and says in step.observation
    assert step.info == {"tool_calls": 1, "tool_errors": 1}


def test_calls_past_the_per_turn_limit_are_refused():
    step = _Echo().step(_call("echo", text="a") + _call("echo", text="b") + _call("echo", text="c"))
    assert step.observation.split("\n") == ["a", "b", "error: at most 2 tool calls per turn"]
    assert step.info == {"tool_calls": 3, "tool_errors": 1}


def test_a_turn_without_a_call_is_the_answer():
    assert _Echo().step("yes") == Step(None, 1.0, True)


# ---- the calculator ------------------------------------------------------------------
@pytest.mark.parametrize("expr,value", [
    ("23 * 47", "1081"), ("(2 + 3) * -4", "-20"), ("7 / 2", "3.5"), ("8 / 2", "4"), ("2 ^ 10", "1024"),
    ("17 // 5 % 3", "0"), ("1,000 × 3", "3000"), ("10 ÷ 4", "2.5"), ("1 / 3", "0.3333333333"), (" 2**0.5 ", "1.414213562"),
])
def test_calculate(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr,says", [
    ("__import__('os').system('id')", "only numbers"),
    ("x + 1", "only numbers"),
    ("(1).real", "only numbers"),
    ("'a' * 3", "only numbers"),
    ("True + 1", "only numbers"),
    ("2 ** 1000", "exponents of at most"),
    ("9 ** 64 ** 2", "exponents of at most"),
    ("(10 ** 20) * (10 ** 20)", "too large"),
    ("(-8) ** 0.5", "not real"),
    ("1 +", "cannot read"),
    ("", "empty"),
    ("1+" * 200 + "1", "longer than"),
])
def test_calculate_refuses_anything_but_arithmetic(expr, says):
    with pytest.raises(ValueError, match=says):
        calculate(expr)


def test_calculate_division_by_zero_is_an_error_observation():
    env = CalculatorEnv()
    env.reset({"question": "q", "answer": "1"})
    step = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>')
    assert step.observation == "error: division by zero" and step.info["tool_errors"] == 1


def test_calculator_episode_protocol():
    env = CalculatorEnv()
    messages = env.reset({"question": "What is 23 * 47?", "answer": "1081"})
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user", "content": "What is 23 * 47?"}
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant", "tool", "assistant"]  # the worked example
    assert env.step(CALL) == Step("1081", 0.0, False, {"tool_calls": 1, "tool_errors": 0})
    assert env.step("1081") == Step(None, 1.0, True)
    assert env.step("It is 1080.") == Step(None, 0.0, True)
    assert len(CalculatorEnv(few_shot=False).reset({"question": "q", "answer": "1"})) == 2


# ---- code with feedback (runs the sandbox) ---------------------------------------------
TESTS = "assert _same(add(2, 3), 5)\nassert _same(add(-4, 4), 0)"


def test_code_feedback_shows_the_failing_test_then_rewards_the_fix():
    env = CodeFeedbackEnv(max_attempts=3)
    assert env.reset({"question": "Write add(a, b).", "answer": TESTS}) == "Write add(a, b)."
    first = env.step("```python\ndef add(a, b):\n    return a - b\n```")
    assert not first.done and first.reward == 0.0 and first.observation["role"] == "user"
    assert "assert _same(add(2, 3), 5)" in first.observation["content"]  # the failing assert, from the traceback
    assert 'File "main.py"' in first.observation["content"]  # the sandbox's path is not shown
    assert env.step("```python\ndef add(a, b):\n    return a + b\n```") == Step(None, 1.0, True)


def test_code_feedback_reward_is_the_last_attempts():
    env = CodeFeedbackEnv(max_attempts=2)
    env.reset({"question": "q", "answer": TESTS})
    assert not env.step("def add(a, b): return 0").done
    assert env.step("def add(a, b): raise ValueError('no')") == Step(None, 0.0, True)  # out of attempts


def test_code_feedback_reports_a_timeout():
    env = CodeFeedbackEnv(max_attempts=2, timeout_s=1.0)
    env.reset({"question": "q", "answer": TESTS})
    step = env.step("while True:\n    pass")
    assert "did not finish within 1 s" in step.observation["content"]
