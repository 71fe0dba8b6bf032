"""Environments of multi-turn episodes, and the tool-call convention they parse.

    class MyEnv(Environment):
        def reset(self, row): return row["question"]                 # the first prompt
        def step(self, text): return Step(observation, reward, done)  # after every model turn

An episode (rollout/episode.py) builds one environment per rollout from the config's `env`
node (Hydra `_target_`), calls `reset(row)` with the task row, then alternates: the engine
generates a turn, `step(turn_text)` answers it. `reset` returns the first prompt: a string
(the user message, after the task's system prompt) or a list of chat messages. `step` returns
`(observation, reward, done)` (a `Step`, or any 3- or 4-tuple): the observation is a string
(rendered in the chat template's `tool` role), a chat message dict (`{"role": "user",
"content": ...}`), or None when done. The episode's reward is the sum of the rewards of its
steps (per-turn rewards add up; most environments reward only the last step). Either method
may be `async def`; plain methods run in a thread, so a slow tool does not stop generation.
An exception or a time-out (`rollout.env_timeout_s`) fails the episode: its group is dropped
with reason `error`, counted and logged, and the run goes on.

`ToolEnvironment` implements `step` for the `<tool_call>{json}</tool_call>` convention (the
Hermes/Qwen tool-call format; SmolLM2's chat template renders any role, so the result comes
back as a `tool` message): every call in the turn runs, their results (or what was wrong with
the call) are the observation, and a turn without a call is the final answer, scored by
`answer`. A malformed call (bad JSON, an unknown tool, wrong arguments, an unclosed tag) is
never an exception: its observation says what was wrong, and it counts in `tool_errors`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

Message = dict[str, str]  # {"role": ..., "content": ...}
Observation = Union[str, Message, None]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
CALL_FORMAT = '<tool_call>{"name": "...", "arguments": {...}}</tool_call>'


class Step(NamedTuple):
    observation: Observation
    reward: float
    done: bool
    info: dict = {}  # counters the episode adds up: tool_calls, tool_errors (ToolEnvironment fills them)


class Environment:
    """Base class of episode environments (a plain class with these two methods works too)."""

    def reset(self, row: dict) -> str | list[Message]:
        """Start an episode on one task row ({"question", "answer", "index", "split"}); return the prompt."""
        raise NotImplementedError

    def step(self, text: str) -> Step | tuple:
        """The model's turn (decoded, special tokens removed) -> (observation, reward, done)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class BadCall:
    error: str  # what was wrong, said to the model as the call's result


def parse_tool_calls(text: str) -> list[ToolCall | BadCall]:
    """Every `<tool_call>...</tool_call>` block of a model turn, in order; [] = no call.

    The block holds a JSON object {"name": str, "arguments": object}; "arguments" may also be a
    JSON-encoded string (OpenAI style) or be called "parameters" (Llama 3.1 style), and may be
    left out for a tool without arguments. An opening tag never closed (the turn hit its token
    limit) is a BadCall; so is everything else that cannot be called.
    """
    calls: list[ToolCall | BadCall] = [_parse_one(m.group(1)) for m in _BLOCK.finditer(text)]
    tail = text[text.rfind(CLOSE) + len(CLOSE):] if CLOSE in text else text
    if OPEN in tail:
        calls.append(BadCall(f"the tool call was not closed with {CLOSE}; write {CALL_FORMAT}"))
    return calls


def _parse_one(body: str) -> ToolCall | BadCall:
    body = body.strip()
    try:
        obj = json.loads(body)
    except ValueError as e:
        return BadCall(f"the tool call is not valid JSON ({e}); write {CALL_FORMAT}")
    if not isinstance(obj, dict):
        return BadCall(f"the tool call must be a JSON object, not {type(obj).__name__}; write {CALL_FORMAT}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return BadCall(f'the tool call has no "name"; write {CALL_FORMAT}')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return BadCall(f'the "arguments" of {name} are a string that is not JSON; give a JSON object')
    if not isinstance(args, dict):
        return BadCall(f'the "arguments" of {name} must be a JSON object, not {type(args).__name__}')
    return ToolCall(name, args)


class ToolEnvironment(Environment):
    """An environment whose model calls tools, then answers.

    Subclasses pass their tools (name -> function taking keyword arguments and returning the
    result) and implement `reset` and `answer`. An exception in a tool becomes an error
    observation (the model may retry) and counts in `tool_errors`; `max_calls_per_turn` bounds
    the calls one turn may make (the rest are answered with an error); a result longer than
    `result_chars` is cut.
    """

    def __init__(self, tools: dict[str, Callable[..., Any]], max_calls_per_turn: int = 4,
                 result_chars: int = 500) -> None:
        self.tools = dict(tools)
        self.max_calls_per_turn = max_calls_per_turn
        self.result_chars = result_chars

    def answer(self, text: str) -> Step:
        """The final answer (a turn without a tool call) -> Step(None, reward, True)."""
        raise NotImplementedError

    def step(self, text: str) -> Step:
        calls = parse_tool_calls(text)
        if not calls:
            return self.answer(text)
        results, errors = [], 0
        for i, call in enumerate(calls):
            if i < self.max_calls_per_turn:
                out, ok = self.call(call)
            else:
                out, ok = f"error: at most {self.max_calls_per_turn} tool calls per turn", False
            results.append(out[: self.result_chars])
            errors += not ok
        return Step("\n".join(results), 0.0, False, {"tool_calls": len(calls), "tool_errors": errors})

    def call(self, call: ToolCall | BadCall) -> tuple[str, bool]:
        """(result text, whether the call succeeded)."""
        if isinstance(call, BadCall):
            return f"error: {call.error}", False
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: there is no tool {call.name!r}; the tools are {', '.join(sorted(self.tools))}", False
        try:
            return str(tool(**call.arguments)), True
        except TypeError as e:  # wrong or missing arguments
            return f"error: bad arguments for {call.name}: {e}", False
        except Exception as e:  # the tool refused the input (or failed on it): the model may retry
            return f"error: {e}" if isinstance(e, (ValueError, ArithmeticError)) else f"error: {type(e).__name__}: {e}", False
