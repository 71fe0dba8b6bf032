"""One real trainer step on the tiny model: the rewarded response becomes more likely, the other less,
and the micro-batch size does not change the update."""

import torch

from rollout.trajectory import Trajectory
from tests.conftest import compose


def _trainer(tiny_model_dir, tmp_path, *overrides):
    from trainer.worker import TrainerWorker

    cfg = compose(["model=tiny", f"output_dir={tmp_path}", "trainer.lr=1e-3", "trainer.batch_size=2",
                   "trainer.group_size=2", *overrides], cluster_gpus=0)
    return TrainerWorker(cfg, tiny_model_dir)


def _logp(trainer, trajs):
    from trainer.packing import per_trajectory

    tb = trainer._batch_tensors(trajs)
    with torch.no_grad():
        per_token = per_trajectory(trainer._logprobs(tb, False)[0], trajs, tb)
    return torch.tensor([sum(v) for v in per_token])  # (B,) sequence log-prob


def _group(trainer):
    prompt = [1, 2, 3, 4, 5]
    trajs = []
    for k, (resp, reward) in enumerate([([10, 11, 12], 1.0), ([20, 21], 0.0)]):
        t = Trajectory(f"0-{k}", 0, "0", prompt, resp, [0.0] * len(resp), [0] * len(resp), 0, reward=reward)
        trajs.append(t)
    # behaviour log-probs = the trainer's own (on-policy), per token, at the sampling temperature
    from trainer.packing import per_trajectory

    tb = trainer._batch_tensors(trajs)
    with torch.no_grad():
        per_token = per_trajectory(trainer._logprobs(tb, False)[0], trajs, tb)
    for t, values in zip(trajs, per_token):
        t.logp_behav = values
    return trajs


def test_step_moves_probability_towards_the_rewarded_response(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    trajs = _group(trainer)
    before = _logp(trainer, trajs)
    metrics = trainer.train_step(trajs)
    after = _logp(trainer, trajs)
    assert after[0] > before[0] and after[1] < before[1]
    assert metrics["train/active_frac"] == 1.0 and abs(metrics["policy/logp_prox_minus_behav"]) < 1e-5


def test_micro_batch_size_does_not_change_the_gradient(tiny_model_dir, tmp_path):
    # compared before the optimizer: Adam's m / sqrt(v) turns float noise in near-zero gradients
    # into sign flips, so parameters after a step are no test of the gradient
    grads = []
    for mb in (1, 2):
        trainer = _trainer(tiny_model_dir, tmp_path, "trainer.pack_sequences=false", f"trainer.micro_batch_size={mb}",
                           "trainer.grad_clip=1e9")
        trainer.optimizer.step = lambda: None
        trainer.train_step(_group(trainer))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))
    scale = grads[1].abs().max()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * scale.item())
