"""Episodes with scripted model turns (no engine): the environment protocol, the token layout of the
context (it is the chat template's rendering of the conversation), the loss mask, versions and
log-probs of every token, the end conditions and environment failures."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from rewards.calculator import CalculatorEnv
from rewards.env import Step
from rewards.tasks import build_task
from rollout.engine import SamplingSpec
from rollout.episode import EnvironmentFailure, EpisodeRunner, episode_metrics
from rollout.trajectory import Trajectory
from tests.conftest import REPO, compose

SMOL = REPO / ".cache" / "models" / "smollm2-135m"
ROW = {"question": "What is 23 * 47? Answer with only the number.", "answer": "1081", "index": 0, "split": "train"}
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "23 * 47"}}</tool_call>'


@pytest.fixture(scope="module")
def tokenizer():
    if not (SMOL / "tokenizer.json").exists():
        pytest.skip("the bundled model is not prepared (python -m rollout.models)")
    return AutoTokenizer.from_pretrained(SMOL)


class Script:
    """A stand-in for RolloutWorker._sample: the turns are given as text; each token gets the
    log-prob -(turn + 1) and the version of `versions[turn]` (a list: per token, an interrupted turn)."""

    def __init__(self, tokenizer, turns: list[str], versions=None, finish=None, eos: bool = True):
        self.tok, self.turns, self.versions, self.finish, self.eos = tokenizer, turns, versions or {}, finish or {}, eos
        self.calls: list[tuple[str, int, SamplingSpec]] = []

    async def __call__(self, request_id, prompt_ids, spec):
        turn = len(self.calls)
        self.calls.append((request_id, len(prompt_ids), spec))
        ids = self.tok(self.turns[turn], add_special_tokens=False)["input_ids"]
        reason = self.finish.get(turn, "stop")
        if reason == "stop" and self.eos:
            ids = ids + [self.tok.eos_token_id]
        ids = ids[: spec.max_tokens]
        version = self.versions.get(turn, 0)
        versions = version[: len(ids)] if isinstance(version, list) else [version] * len(ids)
        return {"tokens": ids, "logps": [-(turn + 1.0)] * len(ids), "versions": versions,
                "finish_reason": reason if len(ids) < spec.max_tokens or reason != "stop" else "length",
                "interruptions": int(isinstance(version, list))}


def _runner(tokenizer, *overrides, env=None):
    cfg = compose(["task=calculator", *overrides])
    if env is not None:
        cfg.env = {"_target_": env}
    stats: dict = {}
    return EpisodeRunner(cfg, tokenizer, build_task(cfg.task), stats), stats


def _run(runner, script, spec=SamplingSpec(max_tokens=48, seed=1)):
    return asyncio.run(runner.run("w0-0-0", ROW, spec, script))


def test_calculator_episode_context_is_the_chat_template_rendering(tokenizer):
    runner, stats = _runner(tokenizer)
    script = Script(tokenizer, [CALL, "1081"], versions={0: 3, 1: 4})
    out = _run(runner, script)
    assert out["reward"] == 1.0 and out["finish_reason"] == "stop"
    assert out["info"] == {"turns": 2, "tool_calls": 1, "tool_errors": 0, "turn_rewards": [0.0, 1.0],
                           "episode_end": "done", "env_s": out["info"]["env_s"]}
    # the tokens the engine saw are exactly the template's rendering of the whole conversation
    messages = CalculatorEnv().reset(ROW) + [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "1081"},
                                             {"role": "assistant", "content": "1081"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(out["prompt_ids"] + out["tokens"]) + "\n" == rendered
    # model tokens: mask 1, their own log-probs and versions; environment tokens: mask 0, log-prob 0, the
    # version of the turn before them
    n_call = len(tokenizer(CALL, add_special_tokens=False)["input_ids"]) + 1
    env_text = "\n<|im_start|>tool\n1081<|im_end|>\n<|im_start|>assistant\n"
    n_env = len(tokenizer(env_text, add_special_tokens=False)["input_ids"])
    n_answer = len(tokenizer("1081", add_special_tokens=False)["input_ids"]) + 1
    assert out["loss_mask"] == [1] * n_call + [0] * n_env + [1] * n_answer
    assert tokenizer.decode(out["tokens"][n_call:n_call + n_env]) == env_text
    assert out["logps"] == [-1.0] * n_call + [0.0] * n_env + [-2.0] * n_answer
    assert out["versions"] == [3] * n_call + [3] * n_env + [4] * n_answer
    # the second turn was generated from the whole context so far
    assert script.calls[1][1] == len(out["prompt_ids"]) + n_call + n_env
    assert stats["episodes"] == 1 and stats["turns"] == 2 and stats["tool_calls"] == 1 and stats["env_errors"] == 0


def test_malformed_call_becomes_an_observation_and_the_episode_goes_on(tokenizer):
    runner, stats = _runner(tokenizer)
    out = _run(runner, Script(tokenizer, ['<tool_call>{"name": "calculator", "arguments": {"expr": 1}}</tool_call>',
                                          "<tool_call>{oops</tool_call>", CALL, "1081"]))
    assert out["reward"] == 1.0 and out["info"]["turns"] == 4
    assert out["info"]["tool_calls"] == 3 and out["info"]["tool_errors"] == 2
    assert "error: bad arguments for calculator" in out["text"] and "error: the tool call is not valid JSON" in out["text"]


def test_no_call_is_the_final_answer(tokenizer):
    runner, _ = _runner(tokenizer)
    out = _run(runner, Script(tokenizer, ["It is 1080."]))
    assert out["reward"] == 0.0 and out["info"]["turns"] == 1 and out["info"]["episode_end"] == "done"
    assert out["loss_mask"] == [1] * len(out["tokens"])


def test_max_turns_ends_the_episode_without_a_reward(tokenizer):
    runner, _ = _runner(tokenizer, "rollout.max_turns=2")
    out = _run(runner, Script(tokenizer, [CALL, CALL, "1081"]))
    assert out["info"]["turns"] == 2 and out["info"]["episode_end"] == "max_turns"
    assert out["reward"] == 0.0 and out["finish_reason"] == "length"
    assert out["loss_mask"][-1] == 1  # no observation after the last turn


def test_token_budget_limits_turns_and_drops_an_observation_that_does_not_fit(tokenizer):
    n_call = len(tokenizer(CALL, add_special_tokens=False)["input_ids"]) + 1
    runner, _ = _runner(tokenizer, f"rollout.max_episode_tokens={n_call + 5}")
    out = _run(runner, Script(tokenizer, [CALL, "1081"]))
    assert out["info"]["episode_end"] == "token_budget" and out["finish_reason"] == "length"
    assert len(out["tokens"]) == n_call and sum(out["loss_mask"]) == n_call

    # room for the observation: the next turn gets only what is left of the budget
    runner, _ = _runner(tokenizer, f"rollout.max_episode_tokens={n_call + 16}")
    script = Script(tokenizer, [CALL, "1081"])
    out = _run(runner, script)
    assert len(out["tokens"]) <= n_call + 16 and script.calls[1][2].max_tokens == n_call + 16 - (script.calls[1][1] - script.calls[0][1])


def test_a_turn_cut_at_its_limit_gets_the_whole_end_of_turn(tokenizer):
    runner, _ = _runner(tokenizer)
    out = _run(runner, Script(tokenizer, [CALL, "1081"], finish={0: "length"}))
    n = len(tokenizer(CALL, add_special_tokens=False)["input_ids"])  # no <|im_end|>: the template's is added
    assert tokenizer.decode(out["tokens"][n:n + 3]) == "<|im_end|>\n<|im_start|>"
    assert out["loss_mask"][n:n + 3] == [0, 0, 0]


def test_interrupted_turn_keeps_per_token_versions(tokenizer):
    runner, _ = _runner(tokenizer)
    n_call = len(tokenizer(CALL, add_special_tokens=False)["input_ids"]) + 1
    split = [5] * 10 + [6] * (n_call - 10)  # a publish landed mid-turn
    out = _run(runner, Script(tokenizer, [CALL, "1081"], versions={0: split, 1: 6}))
    assert out["versions"][:n_call] == split and out["interruptions"] == 1
    assert set(out["versions"][n_call:]) == {6}


def test_turn_seeds_differ_and_greedy_stays_greedy(tokenizer):
    runner, _ = _runner(tokenizer)
    script = Script(tokenizer, [CALL, "1081"])
    _run(runner, script)
    assert script.calls[0][2].seed != script.calls[1][2].seed
    script = Script(tokenizer, [CALL, "1081"])
    _run(runner, script, SamplingSpec(max_tokens=48, temperature=0.0))
    assert [c[2].seed for c in script.calls] == [None, None]


def test_without_chat_template_observations_are_plain_text(tokenizer):
    runner, _ = _runner(tokenizer, "task.chat_template=false")
    out = _run(runner, Script(tokenizer, [CALL, "1081"], eos=False))
    assert "\n1081\n" in out["text"] and "<|im_start|>" not in tokenizer.decode(out["prompt_ids"] + out["tokens"])


# ---- user environments and their failures ----------------------------------------------
class Countdown:
    """A plain class (no base): asks for the numbers n..1, one per turn; async step."""

    def reset(self, row):
        self.n = 3
        return f"Count down from {self.n}."

    async def step(self, text):
        ok = text.strip() == str(self.n)
        self.n -= 1
        return (f"{self.n}?" if self.n else None), float(ok), self.n == 0


class Raises:
    def reset(self, row):
        return "q"

    def step(self, text):
        raise RuntimeError("environment bug")


class Sleeps:
    def reset(self, row):
        return "q"

    def step(self, text):
        import time

        time.sleep(5)


class ReturnsJunk:
    def reset(self, row):
        return "q"

    def step(self, text):
        return "just a string"


class ForgetsObservation:
    def reset(self, row):
        return "q"

    def step(self, text):
        return Step(None, 0.0, False)


def test_user_environment_rewards_add_up(tokenizer):
    runner, _ = _runner(tokenizer, env=f"{__name__}.Countdown")
    out = _run(runner, Script(tokenizer, ["3", "2", "7"]))
    assert out["info"]["turn_rewards"] == [1.0, 1.0, 0.0] and out["reward"] == 2.0
    assert out["info"]["episode_end"] == "done" and out["info"]["tool_calls"] == 0
    # a string observation goes in the template's tool role
    assert "<|im_start|>tool\n2?<|im_end|>" in out["text"]


@pytest.mark.parametrize("env,says,counter", [
    ("Raises", "Raises.step raised RuntimeError: environment bug", "env_errors"),
    ("Sleeps", "Sleeps.step did not return within rollout.env_timeout_s=0.5 s", "env_timeouts"),
    ("ReturnsJunk", "must return (observation, reward, done), got str", "env_errors"),
    ("ForgetsObservation", "done=False with observation=None", "env_errors"),
])
def test_environment_failures_are_counted_and_raised(tokenizer, env, says, counter):
    runner, stats = _runner(tokenizer, "rollout.env_timeout_s=0.5", env=f"{__name__}.{env}")
    with pytest.raises(EnvironmentFailure, match=says.replace("(", r"\(").replace(")", r"\)")):
        _run(runner, Script(tokenizer, ["x"]))
    assert stats[counter] == 1 and stats["episodes"] == 0


def test_environment_that_cannot_be_built_fails_the_episode(tokenizer):
    runner, stats = _runner(tokenizer, env="rewards.calculator.NoSuchEnv")
    with pytest.raises(EnvironmentFailure, match="env could not be built"):
        _run(runner, Script(tokenizer, ["x"]))
    assert stats["env_errors"] == 1


# ---- trajectories and metrics ----------------------------------------------------------
def test_trajectory_loss_mask_defaults_to_all_ones_and_is_checked():
    t = Trajectory("0-0", 0, "0", [1, 2], [3, 4, 5], [-1.0] * 3, [0] * 3, 0)
    assert t.loss_weights() == [1.0] * 3 and t.num_trained_tokens == 3
    t = Trajectory("0-0", 0, "0", [1, 2], [3, 4, 5], [-1.0] * 3, [0] * 3, 0, loss_mask=[1, 0, 1])
    assert t.loss_weights() == [1.0, 0.0, 1.0] and t.num_trained_tokens == 2
    with pytest.raises(ValueError, match="response has 3 tokens but a loss mask of 2"):
        Trajectory("0-0", 0, "0", [1], [3, 4, 5], [-1.0] * 3, [0] * 3, 0, loss_mask=[1, 0])


def test_episode_metrics():
    def ep(mask, turns, calls, errors, env_s):
        n = len(mask)
        return Trajectory("0-0", 0, "0", [1], list(range(n)), [0.0] * n, [0] * n, 0, loss_mask=mask,
                          info={"turns": turns, "tool_calls": calls, "tool_errors": errors, "env_s": env_s})

    m = episode_metrics([ep([1, 1, 0, 0, 1, 1], 2, 1, 0, 0.25), ep([1, 1], 1, 0, 0, 0.5)])
    assert m == {"episode/turns_mean": 1.5, "episode/tool_calls": 0.5, "episode/tool_errors": 0.0,
                 "episode/model_token_frac": 6 / 8, "time/env_s": 0.75}
    assert episode_metrics([Trajectory("0-0", 0, "0", [1], [2], [0.0], [0], 0)]) == {}  # single-turn: none


def test_shipped_env_configs_build(tokenizer):
    from rollout.episode import build_env

    for name in ("calculator", "code_feedback"):
        cfg = compose([f"task={name}"])
        assert type(build_env(cfg.env)).__name__ in ("CalculatorEnv", "CodeFeedbackEnv")


def test_a_failing_episode_cancels_the_rest_of_its_group():
    from rollout.episode import gather_group

    cancelled = []

    async def slow(i):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async def fails():
        await asyncio.sleep(0.01)
        raise EnvironmentFailure("env broke")

    async def main():
        with pytest.raises(EnvironmentFailure, match="env broke"):
            await gather_group([slow(0), fails(), slow(2)])
        assert await gather_group([asyncio.sleep(0, result=k) for k in range(3)]) == [0, 1, 2]

    asyncio.run(main())
    assert sorted(cancelled) == [0, 2]


def test_readme_custom_environment(tokenizer, monkeypatch):
    """The README's GuessNumber example, run as written: hints between turns, reward at the end."""
    import re
    import sys
    import types

    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n# my_envs.py\n(.*?)```", readme, re.DOTALL).group(1)
    assert len(code.strip().splitlines()) <= 25
    module = types.ModuleType("my_envs")
    exec(compile(code, "my_envs.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "my_envs", module)
    secret = module.GuessNumber()
    secret.reset(ROW)  # the same row gives the same secret
    runner, _ = _runner(tokenizer, "rollout.max_turns=6", env="my_envs.GuessNumber")
    out = _run(runner, Script(tokenizer, ["0", "no idea", str(secret.secret)]))
    assert out["reward"] == 1.0 and out["info"]["turns"] == 3 and out["info"]["episode_end"] == "done"
    assert "0 is wrong; go higher." in out["text"] and "Answer with a number." in out["text"]
