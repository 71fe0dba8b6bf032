"""Build a task (train/eval problems plus its reward function) from `cfg.task`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import logging
from pathlib import Path

from configs.schema import ConfigError
from rewards.arithmetic import Problem, last_integer_reward, make_splits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    train: list[Problem]
    eval: list[Problem]
    reward_fn: Callable[[str, str], float]  # (response text, reference answer) -> reward
    system_prompt: str | None
    chat_template: bool


def reward_function(name: str) -> Callable[[str, str], float]:
    """The reward function named by `task.reward` (imported on use: `math` needs math-verify)."""
    if name == "math":
        from rewards.math import math_reward

        return math_reward
    if name == "python_exec":
        from rewards.code_task import python_exec_reward

        return python_exec_reward
    if name == "text_hash":
        from rewards.text_hash import text_hash_reward

        return text_hash_reward
    return last_integer_reward
_REPO = Path(__file__).resolve().parent.parent


def resolve_data_path(path: str | None) -> str | None:
    """An absolute path: as given, relative to the working directory, else to the repository."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (_REPO / p).exists():
        p = _REPO / p
    return str(p.resolve())


def build_task(task_cfg) -> Task:
    """Problems and reward of `cfg.task`; raises ConfigError for a bad file, column or size."""
    if task_cfg.name in ("arithmetic", "calculator"):  # calculator: the same questions, answered with a tool
        try:
            train, eval_ = make_splits(task_cfg.seed, task_cfg.num_train, task_cfg.num_eval, task_cfg.max_operand,
                                       task_cfg.ops, task_cfg.min_operand)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif task_cfg.name in ("python_exec", "code_feedback"):  # code_feedback: the same problems, with retries
        from rewards.code_task import make_code_splits

        try:
            train, eval_ = make_code_splits(task_cfg.seed, task_cfg.num_eval)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:  # jsonl / gsm8k: a file through the `datasets` library; malformed rows are skipped and counted
        from rewards.datasets import load_problems

        train, eval_, stats = load_problems(
            task_cfg.path, task_cfg.prompt_key, task_cfg.answer_key,
            eval_path=task_cfg.eval_path, eval_size=task_cfg.num_eval, seed=task_cfg.seed,
        )
        if stats["malformed"]:
            log.warning("%s: skipped %d malformed rows of %d (first: %s)", task_cfg.path, stats["malformed"],
                        stats["rows"], "; ".join(stats["malformed_examples"][:3]))
    return Task(train, eval_, reward_function(task_cfg.reward), task_cfg.system_prompt, task_cfg.chat_template)


def render_prompt(task: Task, tokenizer, question: str) -> list[int]:
    """Token ids of the prompt, through the tokenizer's chat template when the task asks for it."""
    if task.chat_template and tokenizer.chat_template:
        messages = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = f"{task.system_prompt}\n\n{question}\n" if task.system_prompt else f"{question}\n"
    return tokenizer(text)["input_ids"]
