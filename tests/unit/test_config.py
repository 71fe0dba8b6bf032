"""Structured-config validation: one line naming the key, the value and the fix."""

import pytest

from configs.schema import ConfigError, validate
from tests.conftest import compose


def _error(overrides):
    with pytest.raises(ConfigError) as e:
        validate(compose(["output_dir=/tmp/unused", *overrides]))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_valid():
    validate(compose(["output_dir=/tmp/unused"]))


# one out-of-range value for every validated field
BAD = [
    ("model.name=gpt2", "model.name"), ("model.name=hf", "model.path"), ("model.dtype=int8", "model.dtype"),
    ("model.lora.rank=-1", "model.lora.rank"), ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout"), ("model.lora.rank=4 model.lora.target_modules=[]", "model.lora.target_modules"),
    ("task.name=mmlu", "task.name"), ("task.name=jsonl", "task.path"), ("task.reward=bleu", "task.reward"),
    ("task.num_train=0", "task.num_train"), ("task.num_eval=0", "task.num_eval"), ("task.max_operand=1", "task.max_operand"),
    ("task.ops=/", "task.ops"), ("rewards.num_workers=0", "rewards.num_workers"), ("rewards.timeout_s=0", "rewards.timeout_s"),
    ("rollout.engine=sglang", "rollout.engine"), ("rollout.num_workers=0", "rollout.num_workers"),
    ("rollout.max_concurrent_groups=0", "rollout.max_concurrent_groups"), ("rollout.temperature=0", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"), ("rollout.top_p=0.9", "rollout.top_p"), ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
    ("rollout.max_model_len=32", "rollout.max_model_len"), ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization"),
    ("rollout.kv_cache_gib=0", "rollout.kv_cache_gib"), ("rollout.tensor_parallel_size=0", "rollout.tensor_parallel_size"),
    ("rollout.num_cpus=0", "rollout.num_cpus/num_gpus"), ("rollout.num_gpus=-1", "rollout.num_cpus/num_gpus"),
    ("rollout.max_restarts=-1", "rollout.max_restarts"), ("rollout.forced_length_median=0", "rollout.forced_length_median"),
    ("rollout.forced_length_median=8 rollout.forced_length_sigma=-1", "rollout.forced_length_sigma"),
    ("rollout.forced_length_median=8 rollout.forced_length_max=4", "rollout.forced_length_max"),
    ("rollout.forced_length_median=8 rollout.forced_length_max=64", "rollout.forced_length_max"),
    ("staleness.max_staleness=-1", "staleness.max_staleness"), ("staleness.max_running=4", "staleness.max_running"),
    ("staleness.fixed_lag=5", "staleness.fixed_lag"),
    ("trainer.group_size=0", "trainer.group_size"), ("trainer.batch_size=30", "trainer.batch_size"),
    ("trainer.max_steps=0", "trainer.max_steps"), ("trainer.num_cpus=0", "trainer.num_cpus/num_gpus"),
    ("trainer.lr=0", "trainer.lr"), ("trainer.weight_decay=-1", "trainer.weight_decay"), ("trainer.grad_clip=0", "trainer.grad_clip"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"), ("trainer.num_workers=0", "trainer.num_workers"),
    ("trainer.num_workers=2 trainer.fsdp=false", "trainer.fsdp"), ("trainer.lr_warmup_steps=-1", "trainer.lr_warmup_steps"),
    ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps"), ("trainer.inject_nan_steps=[0]", "trainer.inject_nan_steps"),
    ("trainer.torch_threads=0", "trainer.torch_threads"), ("trainer.adam_beta1=1", "trainer.adam_beta1/adam_beta2"),
    ("algorithm.advantage=ppo", "algorithm.advantage"), ("algorithm.loss=dpo", "algorithm.loss"),
    ("algorithm.proximal=old", "algorithm.proximal"), ("algorithm.ewma_decay=1.0", "algorithm.ewma_decay"),
    ("algorithm.eps_low=-0.1", "algorithm.eps_low/eps_high"), ("algorithm.behav_weight_cap=0.5", "algorithm.behav_weight_cap"),
    ("algorithm.behav_weight_cap_mode=soft", "algorithm.behav_weight_cap_mode"), ("algorithm.kl_coef=-1", "algorithm.kl_coef"),
    ("algorithm.kl_estimator=k2", "algorithm.kl_estimator"), ("algorithm.adv_norm_span=0.5", "algorithm.adv_norm_span"),
    ("algorithm.agg_mode=sum", "algorithm.agg_mode"),
    ("trainer.num_minibatches=0", "trainer.num_minibatches"), ("trainer.num_minibatches=5", "trainer.num_minibatches"),
    ("trainer.ppo_epochs=0", "trainer.ppo_epochs"), ("trainer.profile_steps=[0]", "trainer.profile_steps"),
    ("trainer.max_tokens_per_micro_batch=0", "trainer.max_tokens_per_micro_batch"), ("model.lora.rank=4 model.lora.dropout=0.1", "model.lora.dropout"),
    ("trainer.group_size=1 trainer.batch_size=4 algorithm.drop_zero_variance_groups=true", "algorithm.drop_zero_variance_groups"),
    ("algorithm.overlong_buffer=32", "algorithm.overlong_buffer"), ("algorithm.overlong_buffer=-1", "algorithm.overlong_buffer"),
    ("algorithm.overlong_penalty=-1", "algorithm.overlong_penalty"),
    ("batch_invariance.reference_batch_size=0", "batch_invariance.reference_batch_size"),
    ("batch_invariance.reference_num_minibatches=2", "batch_invariance.reference_num_minibatches"),
    ("batch_invariance.reference_batch_size=6 batch_invariance.reference_num_minibatches=4",
     "batch_invariance.reference_num_minibatches"),
    ("weight_sync.backend=mpi", "weight_sync.backend"), ("weight_sync.bucket_mb=0", "weight_sync.bucket_mb"),
    ("weight_sync.timeout_s=0", "weight_sync.timeout_s"), ("checkpoint.every_steps=-1", "checkpoint.every_steps"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"), ("checkpoint.resume=''", "checkpoint.resume"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"), ("eval.every_steps=-1", "eval.every_steps"),
    ("logger.wandb.mode=maybe", "logger.wandb.mode"), ("logger.sample_every=-1", "logger.sample_every"),
    ("logger.log_level=LOUD", "logger.log_level"),
    ("task.min_operand=0", "task.min_operand"), ("task.min_operand=20", "task.min_operand"),
    ("rollout.max_turns=0", "rollout.max_turns"), ("rollout.max_episode_tokens=0", "rollout.max_episode_tokens"),
    ("rollout.env_timeout_s=0", "rollout.env_timeout_s"), ("task.name=calculator", "env"),
    ("task=calculator rollout.max_episode_tokens=512", "rollout.max_model_len"),
    ("task=calculator rollout.forced_length_median=8", "rollout.forced_length_median"),
    ("task=calculator algorithm.overlong_buffer=256", "algorithm.overlong_buffer"),
    ("+env.few_shot=true", "env"), ("+env._target_=no_such_module.Env", "env._target_"),
    ("task=calculator env._target_=rewards.calculator.NoSuchEnv", "env._target_"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_the_key(override, key):
    assert _error(override.split()).startswith(key + "=")


def test_invalid_combination_ewma_with_coupled_ppo():
    msg = _error(["algorithm.proximal=ewma", "algorithm.loss=ppo"])
    assert msg.startswith("algorithm.proximal='ewma'") and "decoupled_ppo" in msg


def test_staleness_message_says_how_to_fix():
    assert _error(["staleness.max_staleness=-1"]) == (
        "staleness.max_staleness=-1 must be >= 0; use 0 for synchronous training")


def test_lora_dropout_is_allowed_once_dropout_is_kept():
    validate(compose(["output_dir=/tmp/unused", "model.lora.rank=4", "model.lora.dropout=0.1",
                      "trainer.disable_dropout=false"]))


def test_episode_tasks_and_environments_are_valid():
    for overrides in (["task=calculator"], ["task=code_feedback"], ["env=calculator"],
                      ["task=calculator", "algorithm.overlong_buffer=64"]):  # an episode's limit is max_episode_tokens
        validate(compose(["output_dir=/tmp/unused", *overrides]))


def test_env_messages_say_how_to_fix():
    assert _error(["task.name=calculator"]).endswith("use task=calculator (it selects env=calculator) or add env=calculator")
    assert "full dotted path of an Environment class" in _error(["+env._target_=no_such_module.Env"])
