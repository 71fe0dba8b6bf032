"""PPO with a critic: GAE by hand (gamma and lambda below 1, masked environment tokens), the clipped value
loss by hand, the critic's loss falling on a fixed batch, and a resumed trainer with its critic taking
exactly the step a straight one takes."""

import pytest
import torch

from tests.helpers import long_tail_batch
from tests.conftest import compose
from trainer.critic import CriticStep, targets, value_loss
from trainer.gae import gae


def test_gae_hand_values():
    # gamma 0.9, lambda 0.8 (gamma * lambda = 0.72), reward 1 at the last token, V = [0.5, 0.4, 0.2]:
    # t=2: delta = 1 - 0.2 = 0.8;                A = 0.8;                               R = 1.0
    # t=1: delta = 0.9 * 0.2 - 0.4 = -0.22;      A = -0.22 + 0.72 * 0.8 = 0.356;       R = 0.756
    # t=0: delta = 0.9 * 0.4 - 0.5 = -0.14;      A = -0.14 + 0.72 * 0.356 = 0.11632;   R = 0.61632
    adv, ret = gae([0.5, 0.4, 0.2], [1, 1, 1], 1.0, 0.9, 0.8)
    assert adv == pytest.approx([0.11632, 0.356, 0.8]) and ret == pytest.approx([0.61632, 0.756, 1.0])
    # gamma = lambda = 1: A = r - V, R = r at every token
    adv, ret = gae([0.5, 0.4, 0.2], [1, 1, 1], 1.0, 1.0, 1.0)
    assert adv == pytest.approx([0.5, 0.6, 0.8]) and ret == pytest.approx([1.0, 1.0, 1.0])


def test_gae_skips_environment_tokens():
    # an episode: model token, two tool-output tokens (mask 0, values ignored), model token. The time steps are
    # the model's: t=3: delta = 1 - 0.4 = 0.6; t=0: delta = 0.9 * 0.4 - 0.5 = -0.14, A = -0.14 + 0.72 * 0.6 = 0.292
    adv, ret = gae([0.5, 9.0, 9.0, 0.4], [1, 0, 0, 1], 1.0, 0.9, 0.8)
    assert adv == pytest.approx([0.292, 0.0, 0.0, 0.6]) and ret == pytest.approx([0.792, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="values"):
        gae([0.1], [1, 1], 1.0, 1.0, 1.0)


def test_value_loss_hand_values():
    # clip 0.2. Token 0: V 1.0, V_old 0.5 -> V_clip 0.7, R 0: (1 - 0)^2 = 1 > 0.49: unclipped term, 0.5 * 1.
    # Token 1: V 0.9, V_old 0.0 -> V_clip 0.2, R 1: (0.2 - 1)^2 = 0.64 > 0.01: the clipped term, 0.5 * 0.64 = 0.32.
    # Token 2: masked. Sum 0.82 over a denominator of 2 tokens -> 0.41.
    v = torch.tensor([[1.0, 0.9, 5.0]], requires_grad=True)
    loss, clipped = value_loss(v, torch.tensor([[0.5, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]),
                               torch.tensor([[1.0, 1.0, 0.0]]), 0.2, 2.0)
    assert loss.item() == pytest.approx(0.41) and clipped.item() == 1
    loss.backward()
    # d/dV: token 0: (V - R) / 2 = 0.5; token 1: clipped, V outside [V_old - c, V_old + c]: no gradient
    assert v.grad[0].tolist() == pytest.approx([0.5, 0.0, 0.0])


def _critic(tiny_model_dir, tmp_path, *overrides):
    cfg = compose(["model=tiny", f"output_dir={tmp_path}", "algorithm.advantage=gae", "trainer.batch_size=6",
                   "trainer.group_size=3", "critic.lr=1e-3", *overrides], cluster_gpus=0)
    torch.manual_seed(0)
    return CriticStep.build(cfg, tiny_model_dir), cfg


@pytest.mark.parametrize("packed", [True, False])
def test_the_critic_learns_the_returns_of_a_fixed_batch(tiny_model_dir, tmp_path, packed):
    critic, cfg = _critic(tiny_model_dir, tmp_path, f"trainer.pack_sequences={str(packed).lower()}",
                          "trainer.max_tokens_per_micro_batch=32")
    batch = long_tail_batch()
    losses, variances = [], []
    for _ in range(6):
        values = critic.values(batch)
        _, returns = targets(batch, values, cfg)
        metrics = critic.train_step(batch, returns, values)
        losses.append(metrics["critic/value_loss"])
        variances.append(metrics["critic/explained_variance"])
    assert losses[-1] < 0.5 * losses[0] and variances[-1] > variances[0]
    assert metrics["critic/clipfrac"] >= 0 and metrics["time/critic_s"] > 0


def test_packed_and_padded_values_agree(tiny_model_dir, tmp_path):
    packed, _ = _critic(tiny_model_dir, tmp_path)
    padded, _ = _critic(tiny_model_dir, tmp_path, "trainer.pack_sequences=false")
    batch = long_tail_batch()
    for a, b in zip(packed.values(batch), padded.values(batch)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5) and len(a) > 0


def test_the_value_clip_acts_from_the_second_update(tiny_model_dir, tmp_path):
    # the first update of a step starts at V = V_old (the values the advantages came from): no clip; the second
    # epoch sees the moved critic. A tiny clip then clips; a huge one never does.
    batch = long_tail_batch()
    fracs = {}
    for clip in (1e-4, 100.0):
        critic, cfg = _critic(tiny_model_dir, tmp_path, "trainer.ppo_epochs=2", f"critic.value_clip={clip}")
        values = critic.values(batch)
        fracs[clip] = critic.train_step(batch, targets(batch, values, cfg)[1], values)["critic/clipfrac"]
    assert fracs[1e-4] > 0.1 and fracs[100.0] == 0.0  # over both epochs: the first is never clipped


def test_a_trainer_with_a_critic_resumes_exactly(tiny_model_dir, tmp_path):
    from trainer.worker import TrainerWorker

    cfg = compose(["model=tiny", f"output_dir={tmp_path}", "algorithm.advantage=gae", "trainer.batch_size=6",
                   "trainer.group_size=3", "critic.lr=1e-3", "trainer.lr=1e-3", "critic.warmup_steps=1"], cluster_gpus=0)
    straight = TrainerWorker(cfg, tiny_model_dir)
    first = straight.train_step(long_tail_batch())
    assert first["critic/warmup"] == 1 and first["train/updates"] == 0  # warm-up: the critic alone
    (tmp_path / "ck").mkdir()
    straight.save(str(tmp_path / "ck"))
    resumed = TrainerWorker(cfg, tiny_model_dir)
    assert resumed.load(str(tmp_path / "ck")) == 1
    a, b = straight.train_step(long_tail_batch(1)), resumed.train_step(long_tail_batch(1))
    assert a["critic/warmup"] == 0 and a["train/updates"] == 1
    for key in ("critic/value_loss", "loss/policy", "critic/explained_variance"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key
    for model in ("model", "critic_model"):
        for (n, p), (_, q) in zip(getattr(straight, model).named_parameters(), getattr(resumed, model).named_parameters()):
            assert torch.equal(p, q), n
