"""Whole episodes through the real loop (real Ray, real engines, gloo weight sync, the tiny model):
every episode runs its turns, environment failures and time-outs drop their groups with reason
`error` and are counted, publishes interrupt turns that resume under the new weights, and nothing is
lost in the accounting."""

import json

import pytest

from tests.conftest import compose
from tests.helpers import metric_rows as _rows

TURNS = 3


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_episodes_end_to_end(tmp_path, ray_local, tiny_model_dir, engine):
    from trainer.loop import run

    steps = 6 if engine == "vllm" else 3
    cfg = compose([
        "model=tiny", f"rollout.engine={engine}", "staleness.max_staleness=2",
        f"trainer.max_steps={steps}", "trainer.batch_size=8", "trainer.group_size=4", "trainer.micro_batch_size=4",
        f"rollout.num_workers={1 if engine == 'vllm' else 2}", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5",
        "rollout.kv_cache_gib=0.25", "rewards.num_workers=1",
        # vLLM: a publish must land mid-turn. The trainer skips its update (equal rewards: every advantage 0),
        # so it waits for the engine; twice a batch of groups is in flight, and the environment answers some
        # rows later than others, so groups end at different times and the publish after a batch's last group
        # finds the others mid-turn (with one batch in flight, or a trainer slower than the engine, it finds none)
        *(["rollout.max_concurrent_groups=4", "+env.fixed_reward=0.0", "+env.stagger_s=0.2"]
          if engine == "vllm" else ["rollout.max_concurrent_groups=2"]),
        # the random tiny model rarely stops: every turn runs to its limit, long enough for publishes to land mid-turn
        f"rollout.max_new_tokens={24 if engine == 'vllm' else 6}", "rollout.max_turns=4", "rollout.max_episode_tokens=200",
        "+env._target_=tests.episode_envs.Turns", f"+env.turns={TURNS}", "+env.fail_every=5", "+env.fail_eval=true",
        "+env.slow_every=7", "+env.slow_s=3.0", "rollout.env_timeout_s=1.0",
        "task.num_eval=4", "eval.max_new_tokens=4", "weight_sync.verify=true", "logger.sample_every=1",
        "logger.wandb.mode=disabled", "logger.progress=false", "checkpoint.export_hf=false", f"output_dir={tmp_path}",
    ])
    summary = run(cfg)

    rows = _rows(tmp_path)
    assert [r["policy_version"] for r in rows] == list(range(1, steps + 1))
    assert summary["verified_publishes"] == steps
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["admitted"] == acc["consumed"] + acc["dropped_total"] + acc["in_flight"]
    assert acc["consumed"] == steps * 8
    ep = acc["episodes"]
    # every consumed episode ran all its turns; the environment answered all but the last of each
    assert ep["consumed"] == acc["consumed"] and ep["turns"] == TURNS * acc["consumed"]
    assert ep["model_tokens"] > 0 and ep["env_tokens"] > 0 and ep["tool_calls"] == 0
    # injected failures (rows 0, 5, 10, ...) and time-outs (rows 1, 8, 15, ...): whole groups dropped as
    # `error`; at least one episode of each such group failed (the others were cancelled with it). Eval
    # row 0 fails too: it scores 0 and the evaluation goes on
    evals = json.loads((tmp_path / "evals.json").read_text())
    assert all(e["samples"][0]["reward"] == 0.0 and "injected" in e["samples"][0]["env_error"] for e in evals)
    failures = ep["env_errors"] + ep["env_timeouts"] - len(evals)
    dropped = acc["dropped"].get("error", 0)
    assert ep["env_errors"] > len(evals) and dropped > 0 and dropped % 4 == 0 and dropped // 4 <= failures <= dropped
    if engine == "vllm":
        assert ep["env_timeouts"] > 0  # the sleeping rows came up too
    for r in rows:
        assert r["episode/turns_mean"] == TURNS and r["episode/tool_calls"] == 0
        assert 0 < r["episode/model_token_frac"] < 1 and r["time/env_s"] > 0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and all("turn 1 read:" in s["response"] for s in samples)
    if engine == "vllm":
        # a publish interrupted turns; they resumed under the new weights (tokens of two versions in one episode)
        assert sum(r["rollout/interrupted"] for r in rows) > 0
        assert any(r["rollout/multi_version_frac"] > 0 for r in rows)


def test_code_feedback_episodes(tmp_path, ray_local, tiny_model_dir):
    """task=code_feedback on the transformers engine: every answer of the random model fails its tests in the
    sandbox, so every episode takes all its attempts, with the failing output between them."""
    from trainer.loop import run

    cfg = compose([
        "model=tiny", "task=code_feedback", "env.max_attempts=2", "rollout.engine=hf", "staleness.max_staleness=1",
        "trainer.max_steps=2", "trainer.batch_size=4", "trainer.group_size=2", "trainer.micro_batch_size=2",
        "rollout.num_workers=1", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5", "rewards.num_workers=1",
        "rollout.max_concurrent_groups=2", "rollout.max_new_tokens=8", "rollout.max_episode_tokens=400",
        "task.num_eval=1", "eval.max_new_tokens=4", "logger.sample_every=1", "logger.wandb.mode=disabled",
        "logger.progress=false", "checkpoint.export_hf=false", f"output_dir={tmp_path}",
    ])
    summary = run(cfg)
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["consumed"] == 8
    assert acc["episodes"]["turns"] == 2 * 8 and acc["episodes"]["env_errors"] == 0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all("The tests failed:" in s["response"] and s["reward"] == 0.0 for s in samples)
    assert summary["eval/reward_final"] == 0.0
