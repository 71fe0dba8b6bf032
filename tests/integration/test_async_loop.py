"""The asynchronous loop end to end on real Ray with the tiny model: versions advance, lag stays
within eta, every publish leaves every engine bitwise equal to the trainer, nothing is lost."""

import json

import pytest

from tests.conftest import compose
from tests.helpers import metric_rows as _rows


@pytest.mark.parametrize("engine,eta", [("hf", 0), ("hf", 2), pytest.param("vllm", 2, marks=pytest.mark.vllm)])
def test_loop_tiny(tmp_path, ray_local, tiny_model_dir, engine, eta):
    from trainer.loop import run

    cfg = compose([
        "model=tiny", f"rollout.engine={engine}", f"staleness.max_staleness={eta}",
        # vLLM: more steps, so that responses interrupted by a publish are consumed before the end
        f"trainer.max_steps={8 if engine == 'vllm' else 4}", "trainer.batch_size=8", "trainer.group_size=4", "trainer.micro_batch_size=4",
        f"rollout.num_workers={1 if engine == 'vllm' else 2}", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5",
        "rollout.kv_cache_gib=0.25",
        f"rollout.max_new_tokens={64 if engine == 'vllm' else 8}", "rewards.num_workers=1",
        # vLLM: twice a batch of groups in flight, with forced lengths of different sizes, so that groups end at
        # different times and a publish (which follows a batch's last group) lands mid-way through the others.
        # With exactly one batch in flight every publish found only requests that had just started (no token yet)
        *(["rollout.max_concurrent_groups=4", "rollout.forced_length_median=32", "rollout.forced_length_sigma=0.7",
            "rollout.forced_length_max=64"] if engine == "vllm" else ["rollout.max_concurrent_groups=2"]),
        "task.num_eval=4", "eval.max_new_tokens=4",
        "weight_sync.verify=true", "logger.wandb.mode=disabled", "logger.progress=false", f"output_dir={tmp_path}",
    ])
    summary = run(cfg)

    rows = _rows(tmp_path)
    steps = 8 if engine == "vllm" else 4
    assert [r["policy_version"] for r in rows] == list(range(1, steps + 1))
    assert all(r["staleness/lag_max"] <= eta for r in rows)
    if eta == 0:
        assert all(r["staleness/lag_mean"] == 0 for r in rows)
    assert summary["verified_publishes"] == steps  # every publish: engines' fingerprints == trainer's
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["identity_holds"]
    assert acc["admitted"] == acc["consumed"] + acc["dropped_total"] + acc["in_flight"]
    assert acc["consumed"] == steps * 8
    for key in ("reward/mean", "loss/policy", "policy/clipfrac", "policy/approx_kl", "policy/entropy",
                "time/weight_sync_s", "perf/consumed_tokens_per_s", "memory/max_allocated_gib"):
        assert key in rows[0], key
    assert (tmp_path / "reward_staleness.png").stat().st_size > 0
    if engine == "vllm" and eta > 0:
        # interruptible generation: some responses carry tokens of two policy versions
        assert sum(r["rollout/interrupted"] for r in rows) > 0
        assert any(r["rollout/multi_version_frac"] > 0 for r in rows)
