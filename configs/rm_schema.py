"""Structured config of scripts/train_rm.py (reward-model training), registered beside the policy's.

Every option has its default here; `validate_rm()` raises ConfigError naming the key, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from configs.schema import CheckpointConfig, ConfigError, LoggerConfig, ModelConfig


@dataclass
class PreferenceDataConfig:
    path: Optional[str] = None  # preference pairs, .jsonl or .parquet (scripts/make_preferences.py writes them)
    eval_path: Optional[str] = None  # held-out pairs; unset = data.num_eval pairs of data.path held out
    num_eval: int = 64
    prompt_key: str = "prompt"  # columns: each text, or chat messages
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    margin_key: Optional[str] = None  # a column of per-pair margins (Llama 2's margin loss); unset = none
    system_prompt: Optional[str] = None  # as task.system_prompt: prompts are rendered as the policy's rollouts are


@dataclass
class RMTrainerConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lr_warmup_steps: int = 0
    batch_size: int = 16  # preference pairs per optimizer step
    max_tokens_per_micro_batch: int = 2048  # tokens of one forward/backward (whole pairs); does not change the gradient
    pack_sequences: bool = True  # packed rows (no compute on padding) or padded ones
    epochs: int = 1
    max_steps: Optional[int] = None  # unset = epochs over the training pairs
    center_rewards_coefficient: float = 0.0  # + c * mean((r_c + r_r)^2): keeps the rewards near 0 (TRL)
    eval_every_steps: int = 10  # held-out pair accuracy and margin; also at the end


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the causal LM the reward model starts from (or a reward model)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    trainer: RMTrainerConfig = field(default_factory=RMTrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    output_dir: str = "outputs/rm"
    cache_dir: Optional[str] = None


def register_rm() -> None:
    ConfigStore.instance().store(name="tether_rm_schema", node=RMConfig)


def validate_rm(cfg) -> None:
    def check(ok: bool, key: str, value, fix: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value!r} {fix}")

    check(cfg.data.path is not None, "data.path", cfg.data.path,
          "must name a .jsonl or .parquet file of prompt/chosen/rejected pairs (make one with scripts/make_preferences.py)")
    t = cfg.trainer
    check(t.lr > 0, "trainer.lr", t.lr, "must be > 0")
    check(t.batch_size >= 1, "trainer.batch_size", t.batch_size, "must be >= 1 pair")
    check(t.max_tokens_per_micro_batch >= 2, "trainer.max_tokens_per_micro_batch", t.max_tokens_per_micro_batch, "must be >= 2")
    check(t.epochs >= 1, "trainer.epochs", t.epochs, "must be >= 1")
    check(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be >= 1, or null for trainer.epochs")
    check(t.center_rewards_coefficient >= 0, "trainer.center_rewards_coefficient", t.center_rewards_coefficient, "must be >= 0")
    check(t.eval_every_steps >= 0, "trainer.eval_every_steps", t.eval_every_steps, "must be >= 0 (0 = only at the end)")
    check(cfg.model.name in ("smollm2-135m", "tiny", "random-1.5b", "hf"), "model.name", cfg.model.name,
          "must be one of smollm2-135m, tiny, random-1.5b, hf")
    check(cfg.model.name != "hf" or bool(cfg.model.path), "model.path", cfg.model.path,
          "must name a model directory when model.name=hf")
