"""Episodes: multi-turn rollouts in which the model's turns alternate with an environment's output.

    runner = EpisodeRunner(cfg, tokenizer, task, stats)         # when the config names an `env`
    out = await runner.run(request_id, row, spec, worker._sample)

One episode (docs/design.md section 6c): the environment (rewards/env.py, built from the config's
`env` node by Hydra `_target_`) gives the prompt (`reset(row)`); then, up to
`rollout.max_turns` times, the engine generates a turn (at most `rollout.max_new_tokens`
tokens), the environment answers it (`step(text) -> observation, reward, done`), and the
observation is appended to the context as the chat template renders it (a string in the
`tool` role, where the template accepts that role, else `user`; a message dict as given). The
episode ends when the environment says done, after `rollout.max_turns` turns, or when the
next observation or turn would pass `rollout.max_episode_tokens` response tokens (or the
engine's `rollout.max_model_len`). Its reward is the sum of the steps' rewards.

The response of the resulting trajectory is every token after the prompt: model turns
(loss_mask 1, their behaviour log-probs and policy versions) and environment tokens (loss_mask
0, log-prob 0, the version of the turn they follow). Each turn goes through the worker's
`_sample`, so a publish interrupts only the current turn, which resumes under the new weights;
the trajectory's start version is the admission's, so staleness counts from the first token.

Environment failures (an exception, or no answer within `rollout.env_timeout_s`) are counted
in the worker's stats (`env_errors`, `env_timeouts`) and raise `EnvironmentFailure`: the
worker drops the group with reason `error`, logs it and goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
import zlib
from dataclasses import replace

from hydra.utils import instantiate

from rewards.env import Step
from rewards.tasks import Task, render_prompt
from rollout.engine import SamplingSpec

log = logging.getLogger(__name__)

STAT_KEYS = ("episodes", "turns", "tool_calls", "tool_errors", "env_errors", "env_timeouts", "env_s")
_MARK = "\u2063MODEL-TURN\u2063"  # stands for a model turn when the template's end-of-turn text is measured


class EnvironmentFailure(RuntimeError):
    """The environment raised or timed out; the episode (and its group) is dropped with reason `error`."""


def build_env(env_cfg):
    """A fresh environment from the config's `env` node (raises what its constructor raises)."""
    return instantiate(env_cfg, _convert_="all")


class ChatFormat:
    """Token ids of what surrounds the model's turns: the first prompt, the end of a turn, and
    an observation, as the tokenizer's chat template renders them.

    The template is rendered on a stand-in conversation with and without the appended message
    and the difference taken (what verl and TRL do too), so any template that renders a longer
    conversation as an extension of the shorter one works. After a turn that ended with the
    engine's stop token the template's end-of-turn text, less that token, is added (SmolLM2:
    "\\n" after <|im_end|>); after a turn cut at its token limit, all of it. Without a chat
    template (or with task.chat_template=false) an observation is its text between newlines.
    """

    def __init__(self, tokenizer, task: Task) -> None:
        self.tokenizer = tokenizer
        self.task = task
        self.template = bool(task.chat_template and tokenizer.chat_template)
        self.tool_role = "tool"
        self._prefix = self.close_text = ""
        if self.template:
            self._before = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                            {"role": "assistant", "content": _MARK}]
            self._prefix = self._render(self._before, False)
            self.close_text = self._prefix[self._prefix.index(_MARK) + len(_MARK):]
            try:
                self._delta({"role": "tool", "content": "0"})
            except Exception as e:  # jinja raises for roles the template does not know
                log.warning("the chat template does not render a 'tool' message (%s); observations go in the "
                            "'user' role", str(e).splitlines()[0][:200])
                self.tool_role = "user"

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _delta(self, message: dict) -> str:
        full = self._render(self._before + [message], True)
        if not full.startswith(self._prefix):
            raise ValueError("the tokenizer's chat template renders a conversation's beginning differently once a "
                             "message is appended; episodes need a template that only appends (or task.chat_template=false)")
        return full[len(self._prefix):]

    def prompt_ids(self, first: str | list[dict]) -> list[int]:
        """The prompt of `reset`'s answer: a question (after the task's system prompt) or chat messages."""
        if isinstance(first, str):
            return render_prompt(self.task, self.tokenizer, first)
        if self.template:
            return self._ids(self._render(first, True))
        return self.tokenizer("\n\n".join(m["content"] for m in first) + "\n")["input_ids"]

    def after_turn(self, turn_ids: list[int], finish_reason: str, observation: str | dict) -> list[int]:
        """The tokens appended after a model turn: the end of the turn, the observation and the
        header of the next model turn."""
        message = observation if isinstance(observation, dict) else {"role": self.tool_role, "content": observation}
        if not self.template:
            return self._ids(f"\n{message['content']}\n")
        close = self.close_text
        last = self.tokenizer.decode(turn_ids[-1:]) if turn_ids else ""
        if finish_reason == "stop" and last and close.startswith(last):
            close = close[len(last):]  # the model wrote the end-of-turn token itself
        return self._ids(close + self._delta(message))


def _as_step(out) -> Step:
    if isinstance(out, Step):
        step = out
    elif isinstance(out, tuple) and len(out) in (3, 4):
        step = Step(*out)
    else:
        raise TypeError(f"step() must return (observation, reward, done), got {type(out).__name__}")
    if not isinstance(step.reward, (int, float)) or isinstance(step.reward, bool) or not math.isfinite(step.reward):
        raise TypeError(f"step() returned reward={step.reward!r}; it must be a finite number")
    if not step.done and not (isinstance(step.observation, str) or _is_message(step.observation)):
        raise TypeError(f"step() returned done=False with observation={step.observation!r}; give a string or a "
                        "{'role': ..., 'content': ...} message")
    return step


def _is_message(x) -> bool:
    return isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str)


def _check_prompt(first) -> str | list[dict]:
    if isinstance(first, str) or (isinstance(first, list) and first and all(_is_message(m) for m in first)):
        return first
    raise TypeError(f"reset() must return a string or a list of {{'role', 'content'}} messages, got {first!r:.200}")


def _turn_seed(seed: int | None, turn: int) -> int | None:
    return None if seed is None else zlib.crc32(f"{seed}-turn{turn}".encode())


class EpisodeRunner:
    """Runs episodes for one rollout worker; adds its counters (STAT_KEYS) to the worker's `stats`."""

    def __init__(self, cfg, tokenizer, task: Task, stats: dict) -> None:
        self.env_cfg = cfg.env
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer, task)
        r = cfg.rollout
        self.max_turns, self.max_episode_tokens = r.max_turns, r.max_episode_tokens
        self.max_model_len, self.timeout_s = r.max_model_len, r.env_timeout_s
        self.stats = stats
        for key in STAT_KEYS:
            stats.setdefault(key, 0)

    async def _call(self, env, method: str, clock: list[float], *args):
        """env.<method>(*args), async or in a thread, within rollout.env_timeout_s; adds its seconds to clock[0]."""
        fn = getattr(env, method)
        t0 = time.perf_counter()
        try:
            pending = fn(*args) if inspect.iscoroutinefunction(fn) else asyncio.to_thread(fn, *args)
            return await asyncio.wait_for(pending, self.timeout_s)
        except asyncio.TimeoutError:
            self.stats["env_timeouts"] += 1
            raise EnvironmentFailure(f"{type(env).__name__}.{method} did not return within "
                                     f"rollout.env_timeout_s={self.timeout_s:g} s") from None
        except Exception as e:
            self.stats["env_errors"] += 1
            raise EnvironmentFailure(f"{type(env).__name__}.{method} raised {type(e).__name__}: {e}") from e
        finally:
            seconds = time.perf_counter() - t0
            clock[0] += seconds
            self.stats["env_s"] += seconds

    async def _checked(self, env, method: str, clock: list[float], arg, check):
        out = await self._call(env, method, clock, arg)
        try:
            return check(out)
        except TypeError as e:
            self.stats["env_errors"] += 1
            raise EnvironmentFailure(f"{type(env).__name__}.{e}") from None

    async def run(self, request_id: str, row: dict, spec: SamplingSpec, sample) -> dict:
        """One episode. `sample(request_id, prompt_ids, spec)` generates one turn and returns the
        worker's sample dict (tokens, logps, versions, finish_reason, interruptions).

        Returns that dict for the whole response, plus prompt_ids, loss_mask, reward, text and info.
        """
        try:
            env = build_env(self.env_cfg)
        except Exception as e:
            self.stats["env_errors"] += 1
            raise EnvironmentFailure(f"env could not be built: {type(e).__name__}: {e}") from e
        clock = [0.0]  # this episode's seconds in the environment
        try:
            out = await self._episode(env, clock, request_id, row, spec, sample)
        finally:
            if callable(getattr(env, "close", None)):
                await self._call(env, "close", clock)
        out["info"]["env_s"] = clock[0]
        return out

    async def _episode(self, env, clock: list[float], request_id: str, row: dict, spec: SamplingSpec, sample) -> dict:
        prompt_ids = self.format.prompt_ids(await self._checked(env, "reset", clock, row, _check_prompt))
        tokens: list[int] = []
        logps: list[float] = []
        versions: list[int] = []
        mask: list[int] = []
        rewards: list[float] = []
        counts = {"tool_calls": 0, "tool_errors": 0}
        interruptions, end = 0, "max_turns"
        for turn in range(self.max_turns):
            room = min(self.max_episode_tokens - len(tokens), self.max_model_len - len(prompt_ids) - len(tokens))
            if room < 1:
                end = "token_budget"
                break
            turn_spec = replace(spec, max_tokens=min(spec.max_tokens, room), seed=_turn_seed(spec.seed, turn))
            s = await sample(f"{request_id}.t{turn}", prompt_ids + tokens, turn_spec)
            tokens += s["tokens"]
            logps += s["logps"]
            versions += s["versions"]
            mask += [1] * len(s["tokens"])
            interruptions += s["interruptions"]
            text = self.tokenizer.decode(s["tokens"], skip_special_tokens=True)
            step = await self._checked(env, "step", clock, text, _as_step)
            rewards.append(float(step.reward))
            for key in counts:
                counts[key] += int(step.info.get(key, 0))
            if step.done:
                end = "done"
                break
            if turn == self.max_turns - 1 or not versions:
                break
            obs = self.format.after_turn(s["tokens"], s["finish_reason"], step.observation)
            if len(tokens) + len(obs) >= min(self.max_episode_tokens, self.max_model_len - len(prompt_ids)):
                end = "token_budget"  # no room left for the model to answer the observation
                break
            tokens += obs
            logps += [0.0] * len(obs)  # never used: the loss mask is 0 here
            versions += [versions[-1]] * len(obs)  # the version of the turn they follow
            mask += [0] * len(obs)
        self.stats["episodes"] += 1
        self.stats["turns"] += len(rewards)
        self.stats["tool_calls"] += counts["tool_calls"]
        self.stats["tool_errors"] += counts["tool_errors"]
        return {
            "tokens": tokens, "logps": logps, "versions": versions, "loss_mask": mask, "prompt_ids": prompt_ids,
            "finish_reason": "stop" if end == "done" else "length", "interruptions": interruptions,
            "reward": sum(rewards), "text": self.tokenizer.decode(tokens, skip_special_tokens=False),
            "info": {"turns": len(rewards), **counts, "turn_rewards": rewards, "episode_end": end},
        }

async def gather_group(awaitables) -> list:
    """asyncio.gather of a group's episodes; when one fails, the others are cancelled (their turns aborted)
    before the failure propagates: the group is dropped as a whole, so their tokens would be wasted."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def engine_sampler(engine, version: int):
    """A `sample` for `EpisodeRunner.run` straight on the engine (evaluation: no publish runs then)."""

    async def sample(request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> dict:
        seg = await engine.generate(request_id, prompt_ids, spec)
        return {"tokens": seg.token_ids, "logps": seg.logprobs, "versions": [version] * len(seg.token_ids),
                "finish_reason": seg.finish_reason, "interruptions": 0}

    return sample


def episode_metrics(trajs) -> dict[str, float]:
    """Per-step metrics of the episodes in a batch (none for single-turn trajectories): means per episode,
    the environment's seconds summed over the batch, and the share of response tokens the model wrote."""
    eps = [t for t in trajs if "turns" in t.info]
    if not eps:
        return {}
    n = len(eps)
    response = sum(len(t.response_ids) for t in eps)
    return {
        "episode/turns_mean": sum(t.info["turns"] for t in eps) / n,
        "episode/tool_calls": sum(t.info["tool_calls"] for t in eps) / n,
        "episode/tool_errors": sum(t.info["tool_errors"] for t in eps) / n,
        "episode/model_token_frac": sum(t.num_trained_tokens for t in eps) / max(response, 1),
        "time/env_s": sum(t.info["env_s"] for t in eps),
    }
