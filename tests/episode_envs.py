"""Environments for the episode tests (importable by name from Ray actors: `tests.episode_envs.Turns`)."""

from __future__ import annotations

import time

from rewards.text_hash import text_hash_reward


class Turns:
    """Answers each model turn with an observation until `turns` turns were taken; each turn earns a
    pseudo-random reward fixed by its text (so a group's rewards spread). Rows whose index is a
    multiple of `fail_every` raise at the second turn (train rows; eval rows too with `fail_eval`); train
    rows with index % `slow_every` == 1 sleep `slow_s` at the first (0 = never). With `fixed_reward` set,
    every turn earns that instead: every advantage is 0, and the trainer skips its update (a fast step).
    With `stagger_s`, train rows sleep (index % 3) * stagger_s at every turn, so groups end at different times."""

    def __init__(self, turns: int = 3, fail_every: int = 0, slow_every: int = 0, slow_s: float = 0.0,
                 fail_eval: bool = False, fixed_reward: float | None = None, stagger_s: float = 0.0) -> None:
        self.turns, self.fail_every, self.slow_every, self.slow_s = turns, fail_every, slow_every, slow_s
        self.fail_eval, self.fixed_reward, self.stagger_s = fail_eval, fixed_reward, stagger_s
        self.row: dict = {}
        self.turn = 0

    def reset(self, row: dict) -> str:
        self.row, self.turn = row, 0
        return row["question"]

    def step(self, text: str):
        self.turn += 1
        train, index = self.row["split"] == "train", self.row["index"]
        if (train or self.fail_eval) and self.fail_every and index % self.fail_every == 0 and self.turn == 2:
            raise RuntimeError(f"injected environment failure on train row {index}")
        if train and self.slow_every and index % self.slow_every == 1 and self.turn == 1:
            time.sleep(self.slow_s)
        if train and self.stagger_s:
            time.sleep(index % 3 * self.stagger_s)
        done = self.turn >= self.turns
        observation = None if done else f"turn {self.turn} read: {len(text)} characters"
        reward = self.fixed_reward if self.fixed_reward is not None else text_hash_reward(text, "") / self.turns
        return observation, reward, done
