"""Build a task (train/eval problems plus its reward function) from `cfg.task`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from configs.schema import ConfigError
from rewards.arithmetic import Problem, last_integer_reward, make_splits


@dataclass(frozen=True)
class Task:
    train: list[Problem]
    eval: list[Problem]
    reward_fn: Callable[[str, str], float]  # (response text, reference answer) -> reward
    system_prompt: str | None
    chat_template: bool


def build_task(task_cfg) -> Task:
    if task_cfg.name == "arithmetic":
        try:
            train, eval_ = make_splits(task_cfg.seed, task_cfg.num_train, task_cfg.num_eval, task_cfg.max_operand, task_cfg.ops)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return Task(train, eval_, last_integer_reward, task_cfg.system_prompt, task_cfg.chat_template)
    raise ValueError(f"task.name={task_cfg.name!r} is not a known task; use arithmetic")


def render_prompt(task: Task, tokenizer, question: str) -> list[int]:
    """Token ids of the prompt, through the tokenizer's chat template when the task asks for it."""
    if task.chat_template and tokenizer.chat_template:
        messages = [{"role": "system", "content": task.system_prompt}] if task.system_prompt else []
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = f"{task.system_prompt}\n\n{question}\n" if task.system_prompt else f"{question}\n"
    return tokenizer(text)["input_ids"]
