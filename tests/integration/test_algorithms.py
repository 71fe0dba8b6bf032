"""Algorithm options end to end on real Ray with the tiny model: ReMax baselines, the EWMA proximal
policy, a KL term, and batch-size invariance (derived hyper-parameters are used and logged)."""

import json
import logging

import pytest

from tests.conftest import compose
from tests.helpers import one_group
from trainer.invariance import derive_invariant_hparams


def test_remax_baseline_is_greedy_and_same_version(tmp_path, ray_local, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from rewards.tasks import build_task, render_prompt

    cfg = compose(["model=tiny", "rollout.engine=hf", "algorithm.advantage=remax", "trainer.group_size=3",
                   "trainer.batch_size=3", "rollout.max_new_tokens=6", "rollout.max_concurrent_groups=1",
                   f"output_dir={tmp_path}"], cluster_gpus=0)
    group = one_group(cfg, tiny_model_dir)
    samples = [t for t in group if not t.is_baseline]
    (baseline,) = [t for t in group if t.is_baseline]
    assert len(samples) == 3 and baseline.group_id == samples[0].group_id
    assert set(baseline.versions) == {0} and baseline.start_version == samples[0].start_version
    # the baseline is the greedy continuation under the same weights
    from transformers import AutoTokenizer

    task = build_task(cfg.task)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = render_prompt(task, tok, task.train[3].question)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    greedy = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=0, top_k=None,
                            top_p=None, temperature=None, pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    assert baseline.prompt_ids == prompt and baseline.response_ids == greedy


def test_remax_ewma_kl_and_batch_invariance_run(tmp_path, ray_local, tiny_model_dir, caplog):
    from trainer.loop import run

    cfg = compose([
        "model=tiny", "rollout.engine=hf", "algorithm.advantage=remax", "algorithm.proximal=ewma",
        "algorithm.kl_coef=0.1", "algorithm.adv_norm_span=4", "batch_invariance.reference_batch_size=16",
        "staleness.max_staleness=1", "trainer.max_steps=3", "trainer.batch_size=4", "trainer.group_size=2",
        "rollout.num_cpus=0.5", "trainer.num_cpus=0.5", "rollout.max_new_tokens=6", "task.num_eval=2",
        "eval.max_new_tokens=4", "weight_sync.verify=true", "logger.wandb.mode=disabled", "logger.progress=false",
        f"output_dir={tmp_path}",
    ])
    with caplog.at_level(logging.INFO, logger="tether"):
        summary = run(cfg)
    # c = 16 / 4 = 4: lr / 2, EWMA centre of mass 8 -> 32 steps, advantage-norm span 4 -> 16
    expected = derive_invariant_hparams(16, 4, lr_ref=cfg.trainer.lr, ewma_beta_ref=0.889, adv_norm_span_ref=4.0)
    assert expected.lr == pytest.approx(cfg.trainer.lr / 2)
    text = caplog.text
    assert "batch-size invariance: B_ref=16, B=4, c=4" in text and f"lr {expected.lr:.4g}" in text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and summary["verified_publishes"] == 3
    assert all(r["policy/ewma_center_of_mass_steps"] == pytest.approx(expected.ewma_center_of_mass) for r in rows)
    assert all(r["loss/kl"] >= 0 for r in rows)  # k3 is non-negative
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["consumed"] == 3 * 4  # baselines are not counted as trained rollouts


def test_ppo_minibatches_and_dapo_options_run(tmp_path, ray_local, tiny_model_dir):
    """Several PPO updates per batch, DAPO's dynamic sampling and soft overlong punishment, and masked
    truncations, through the real loop: the policy version advances once per batch, every update is
    counted, the penalty reaches the rewards and nothing is lost."""
    from trainer.loop import run

    cfg = compose([
        "model=tiny", "rollout.engine=hf", "trainer.num_minibatches=2", "trainer.ppo_epochs=2",
        "algorithm.drop_zero_variance_groups=true", "algorithm.overlong_buffer=4", "algorithm.overlong_penalty=0.5",
        "algorithm.mask_truncated=true", "task.reward=text_hash", "staleness.max_staleness=1", "trainer.max_steps=3",
        "trainer.batch_size=4", "trainer.group_size=2", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5",
        "rollout.max_new_tokens=8", "task.num_eval=2", "eval.max_new_tokens=4", "weight_sync.verify=true",
        "logger.wandb.mode=disabled", "logger.progress=false", f"output_dir={tmp_path}",
    ])
    summary = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == [1, 2, 3] and summary["verified_publishes"] == 3
    for r in rows:
        # truncated responses (8 tokens) are masked: a minibatch of only truncated ones makes no update
        assert r["train/updates"] in (0, 2, 4) and 0 <= r["rollout/truncated_frac"] <= 1
        assert r["reward/overlong_penalty_mean"] <= 0
    # the tiny random model rarely stops before 8 tokens: those responses got the full penalty of -0.5
    assert min(r["reward/overlong_penalty_mean"] for r in rows) < 0
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["consumed"] == 3 * 4


def test_a_fixed_lag_run_finishes_with_every_batch_exactly_lag_versions_old(tmp_path, ray_local, tiny_model_dir):
    """staleness.fixed_lag = 2 through the real loop: it used to write two steps and then wait forever (the
    versions outran the admissions, so no group two versions old was left). Every step after the first two
    trains on data started exactly 2 versions before it (lags 0, 1 during the first two)."""
    from trainer.loop import run

    cfg = compose([
        "model=tiny", "rollout.engine=hf", "staleness.max_staleness=2", "staleness.fixed_lag=2",
        "trainer.num_minibatches=2", "trainer.max_steps=5", "trainer.batch_size=4", "trainer.group_size=2",
        "task.reward=text_hash", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5", "rollout.max_new_tokens=6",
        "task.num_eval=2", "eval.max_new_tokens=4", "logger.wandb.mode=disabled", "logger.progress=false",
        "checkpoint.enabled=false", f"output_dir={tmp_path}",
    ])
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [(r["staleness/lag_min"], r["staleness/lag_max"]) for r in rows] == [(0, 0), (1, 1), (2, 2), (2, 2), (2, 2)]
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["fixed_lag_short_groups"] == 0 and acc["consumed"] == 5 * 4


def test_ppo_with_a_critic_runs_through_the_loop(tmp_path, ray_local, tiny_model_dir):
    """algorithm.advantage=gae through the real loop: the critic's metrics every step, its warm-up step without a
    policy update, the critic in the checkpoint."""
    from trainer.loop import run

    cfg = compose([
        "model=tiny", "rollout.engine=hf", "algorithm.advantage=gae", "algorithm.gamma=0.99", "algorithm.lam=0.95",
        "critic.warmup_steps=1", "task.reward=text_hash", "trainer.max_steps=3", "trainer.batch_size=4",
        "trainer.group_size=2", "trainer.num_minibatches=2", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5",
        "rollout.max_new_tokens=6", "task.num_eval=2", "eval.max_new_tokens=4", "logger.wandb.mode=disabled",
        "logger.progress=false", "checkpoint.export_hf=false", f"output_dir={tmp_path}",
    ])
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["critic/warmup"] for r in rows] == [1, 0, 0]
    assert [r["train/updates"] for r in rows] == [0, 2, 2]  # no policy update while the critic warms up
    assert all(r["critic/updates"] == 2 and r["critic/value_loss"] > 0 and "critic/explained_variance" in r
               and r["time/critic_s"] > 0 for r in rows)
    (ck,) = (tmp_path / "checkpoints").iterdir()
    assert (ck / "critic.pt").exists() and (ck / "trainer.pt").exists()
    # on CPU at eta > 0 the trainer's threads follow the node (trainer/cpu_share.py), the critic's layers too
    assert all(r["train/cpu_others_busy"] >= 0 and r["train/cpu_threads_changes"] >= 0 for r in rows)
