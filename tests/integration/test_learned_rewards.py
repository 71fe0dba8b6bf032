"""Learned rewards on real Ray with the tiny model: the scorer actor scores as a direct forward pass does,
a rollout group's reward is the configured mix of the rule reward and the (normalised, clipped) model
reward, a scorer that dies mid-run costs one group (counted) and the run finishes with its accounting
whole, and a reward model trained a few steps on the shipped pairs ranks chosen above rejected more often."""

import json
import os
from pathlib import Path

import pytest
import ray
import torch

from tests.conftest import compose
from tests.helpers import metric_rows, one_group

COMMON = ["model=tiny", "rollout.engine=hf", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5", "rollout.max_new_tokens=6",
          "rewards.num_workers=1", "task.num_eval=2", "eval.max_new_tokens=4", "logger.wandb.mode=disabled",
          "logger.progress=false", "checkpoint.enabled=false", "rewards.model.num_cpus=0.5"]


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory):
    """A reward model on the tiny model: its scalar head initialised with a fixed seed."""
    from transformers import AutoTokenizer

    from rewards.reward_model import load_reward_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("rm") / "hf"
    model = load_reward_model(tiny_model_dir, "cpu")
    with torch.no_grad():
        model.score.weight.mul_(50.0)  # scores of a few units: normalisation and clip have something to do
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def test_scorer_actor_scores_as_a_direct_forward_pass(ray_local, tiny_rm_dir):
    from rewards.reward_model import load_reward_model, score_sequences
    from rewards.scorer import RewardModelScorer

    cfg = compose([*COMMON, f"rewards.model.path={tiny_rm_dir}", "rewards.model.max_tokens_per_batch=32"])
    scorer = ray.remote(RewardModelScorer).options(num_cpus=0.5).remote(cfg.rewards.model)
    seqs = [[5, 9, 17, 3], list(range(10, 40)), [7]]
    got = ray.get(scorer.score.remote(seqs))
    model = load_reward_model(tiny_rm_dir, "cpu").eval()
    direct = score_sequences(model, seqs, model.config.pad_token_id)
    assert got["raw"] == pytest.approx(direct, rel=1e-5, abs=1e-6) and got["reward"] == got["raw"]
    assert ray.get(scorer.get_stats.remote())["sequences"] == 3
    ray.kill(scorer)


def test_a_group_reward_mixes_rule_and_model_rewards_with_their_weights(ray_local, tiny_model_dir, tiny_rm_dir, tmp_path):
    from rewards.scorer import RewardModelScorer

    cfg = compose([*COMMON, f"rewards.model.path={tiny_rm_dir}", "rewards.rule_weight=0.5", "rewards.model.weight=2.0",
                   "rewards.model.normalize=true", "rewards.model.clip=1.0", "trainer.group_size=4",
                   "trainer.batch_size=4", "rollout.max_concurrent_groups=1", f"output_dir={tmp_path}"], cluster_gpus=0)
    scorer = ray.remote(RewardModelScorer).options(num_cpus=0.5).remote(cfg.rewards.model)
    group = one_group(cfg, tiny_model_dir, [scorer])
    raw = [t.info["rewards"]["rm"] for t in group]
    # the scorer's first call: normalised by the group's own statistics, then clipped to [-1, 1]
    mean = sum(raw) / len(raw)
    std = (sum((x - mean) ** 2 for x in raw) / (len(raw) - 1)) ** 0.5
    for t, r in zip(group, raw):
        model_reward = max(-1.0, min(1.0, (r - mean) / (std + 1e-6)))
        assert t.reward == pytest.approx(0.5 * t.info["rewards"]["task"] + 2.0 * model_reward, rel=1e-5, abs=1e-6)
    assert len(set(raw)) > 1  # different responses, different scores
    ray.kill(scorer)


def _dying_scorer(marker: str):
    """A scorer whose process dies in its second call, once (the marker file says it already did)."""
    from rewards.scorer import RewardModelScorer

    class _Scorer(RewardModelScorer):
        def score(self, sequences):
            if self.stats["calls"] >= 1 and not os.path.exists(marker):
                Path(marker).write_text("died")
                os._exit(1)
            return super().score(sequences)

    return _Scorer


def test_a_scorer_dying_mid_run_costs_its_group_and_the_run_finishes(ray_local, tiny_model_dir, tiny_rm_dir, tmp_path,
                                                                     monkeypatch):
    import rewards.scorer
    from trainer.loop import run

    monkeypatch.setattr(rewards.scorer, "RewardModelScorer", _dying_scorer(str(tmp_path / "died")))
    cfg = compose([*COMMON, f"rewards.model.path={tiny_rm_dir}", "trainer.max_steps=3", "trainer.batch_size=4",
                   "trainer.group_size=2", "staleness.max_staleness=1", f"output_dir={tmp_path / 'run'}"])
    summary = run(cfg)
    assert (tmp_path / "died").exists()  # the scorer did die, and Ray restarted it
    rows = metric_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("reward/rm_mean" in r and "reward/task_mean" in r for r in rows)
    acc = json.loads((tmp_path / "run" / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["consumed"] == 12
    # the groups whose scoring calls died with the process (one, or a few scored at the same moment)
    errors = rows[-1]["reward/model_errors"]
    assert errors >= 1 and acc["dropped"]["reward_model"] == 2 * errors and summary["steps"] == 3


def test_a_reward_model_trained_on_the_shipped_pairs_ranks_chosen_above_rejected_more_often(tmp_path, tiny_model_dir):
    from tests.helpers import compose_rm
    from trainer.rm_train import train_reward_model

    # held out: the training pairs themselves (a tiny random model cannot generalise; it must fit them)
    cfg = compose_rm(["model=tiny", "data.path=rewards/data/preferences_example.jsonl",
                      "data.eval_path=rewards/data/preferences_example.jsonl",
                      "trainer.lr=1e-3", "trainer.batch_size=8", "trainer.max_steps=12", "trainer.eval_every_steps=0",
                      "logger.wandb.mode=disabled", "logger.progress=false", f"output_dir={tmp_path}"])
    summary = train_reward_model(cfg)
    assert summary["eval_accuracy"] > summary["eval_accuracy_before"]
    assert Path(summary["exported_to"], "config.json").exists()


def test_reward_model_training_resumes_exactly(tmp_path, tiny_model_dir):
    """4 steps in one run against 2 steps, then 2 more resumed from its checkpoint: the same reward model."""
    from safetensors.torch import load_file

    from tests.helpers import compose_rm
    from trainer.rm_train import train_reward_model

    def train(out, steps):
        return train_reward_model(compose_rm([
            "model=tiny", "data.path=rewards/data/preferences_example.jsonl", "data.num_eval=8", "trainer.lr=1e-3",
            "trainer.batch_size=4", f"trainer.max_steps={steps}", "trainer.eval_every_steps=0", "checkpoint.every_steps=2",
            "logger.wandb.mode=disabled", "logger.progress=false", f"output_dir={out}"]))

    straight = train(tmp_path / "straight", 4)
    train(tmp_path / "split", 2)
    resumed = train(tmp_path / "split", 4)
    assert straight["steps"] == resumed["steps"] == 4
    a = load_file(str(tmp_path / "straight" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    rows = metric_rows(tmp_path / "split")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
