"""One real trainer step on the tiny model: the rewarded response becomes more likely, the other less,
and the micro-batch size does not change the update."""

import torch

from rollout.trajectory import Trajectory
from tests.helpers import gradient_of_step, on_policy, policy_step, sequence_logprobs


def _trainer(tiny_model_dir, tmp_path, *overrides):
    return policy_step(tiny_model_dir, tmp_path, "trainer.lr=1e-3", "trainer.batch_size=2", "trainer.group_size=2",
                       *overrides)


def _group(trainer):
    """One group of two, on-policy: the first response rewarded."""
    prompt = [1, 2, 3, 4, 5]
    trajs = [Trajectory(f"0-{k}", 0, "0", prompt, resp, [0.0] * len(resp), [0] * len(resp), 0, reward=reward)
             for k, (resp, reward) in enumerate([([10, 11, 12], 1.0), ([20, 21], 0.0)])]
    return on_policy(trainer, trajs)


def test_step_moves_probability_towards_the_rewarded_response(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    trajs = _group(trainer)
    before = sequence_logprobs(trainer, trajs)
    metrics = trainer.train_step(trajs)
    after = sequence_logprobs(trainer, trajs)
    assert after[0] > before[0] and after[1] < before[1]
    assert metrics["train/active_frac"] == 1.0 and abs(metrics["policy/logp_prox_minus_behav"]) < 1e-5


def test_micro_batch_size_does_not_change_the_gradient(tiny_model_dir, tmp_path):
    # compared before the optimizer: Adam's m / sqrt(v) turns float noise in near-zero gradients
    # into sign flips, so parameters after a step are no test of the gradient
    grads = []
    for mb in (1, 2):
        trainer = _trainer(tiny_model_dir, tmp_path, "trainer.pack_sequences=false", f"trainer.micro_batch_size={mb}",
                           "trainer.grad_clip=1e9")
        grads.append(gradient_of_step(trainer, _group(trainer))[0])
    scale = grads[1].abs().max()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * scale.item())
