"""Environment tokens of an episode (loss_mask 0) get no gradient and leave the token-mean denominator:
real trainer steps of the tiny model, gradients compared before the optimizer."""

import copy

import pytest
import torch

from rollout.trajectory import Trajectory
from tests.helpers import gradient_of_step, policy_step


def _trainer(tiny_model_dir, tmp_path, *overrides):
    return policy_step(tiny_model_dir, tmp_path, "trainer.batch_size=2", "trainer.group_size=2", "trainer.grad_clip=1e9",
                       "trainer.micro_batch_size=1", *overrides)


def _episodes():
    """Two episodes of one group: model turn, tool output (mask 0), model turn, trailing output (mask 0)."""
    prompt = [1, 5, 9, 13]
    trajs = []
    for k, reward in enumerate((1.0, 0.0)):
        turn1, env, turn2, tail = [20 + k, 21, 22], [300, 301, 302, 303], [40 + k, 41], [500, 501]
        response = turn1 + env + turn2 + tail
        mask = [1] * 3 + [0] * 4 + [1] * 2 + [0] * 2
        behav = [-3.0 - 0.1 * i if m else 0.0 for i, m in enumerate(mask)]
        trajs.append(Trajectory(f"0-{k}", 0, "0", prompt, response, behav, [0] * len(response), 0, reward=reward,
                                loss_mask=mask))
    return trajs


def _grad(trainer, trajs):
    return gradient_of_step(trainer, copy.deepcopy(trajs))  # the weights stay: every step starts from the same point


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_environment_tokens_get_no_gradient(tiny_model_dir, tmp_path, agg):
    trainer = _trainer(tiny_model_dir, tmp_path, f"algorithm.agg_mode={agg}")
    base = _episodes()
    g_base, m_base = _grad(trainer, base)
    assert g_base.abs().max() > 0

    # 1. only mask-0 tokens differ: their behaviour log-probs are garbage, the trailing output is other tokens
    #    (no model token follows them, so they are context of nothing trained on)
    other = _episodes()
    for t in other:
        t.logp_behav = [lp if m else -1e4 for lp, m in zip(t.logp_behav, t.loss_mask)]
        t.response_ids[-2:] = [7, 8]
    g_other, m_other = _grad(trainer, other)
    torch.testing.assert_close(g_other, g_base, rtol=0, atol=0)
    assert m_other["policy/entropy"] == m_base["policy/entropy"]  # diagnostics over model tokens only too

    # 2. the trailing output removed altogether: same loss, same gradient (so the token-mean denominator
    #    counts model-written tokens only; the padded width changes, so allow float noise)
    cut = _episodes()
    for t in cut:
        for field in ("response_ids", "logp_behav", "versions", "loss_mask"):
            setattr(t, field, getattr(t, field)[:-2])
    g_cut, _ = _grad(trainer, cut)
    torch.testing.assert_close(g_cut, g_base, rtol=1e-5, atol=1e-5 * g_base.abs().max().item())

    # 3. the check can fail: training on every token (the single-turn default) is another gradient
    ones = _episodes()
    for t in ones:
        t.loss_mask = [1] * len(t.response_ids)
        t.logp_behav = [lp if lp else -3.0 for lp in t.logp_behav]
    g_ones, _ = _grad(trainer, ones)
    assert not torch.allclose(g_ones, g_base, rtol=1e-3, atol=0)


def test_single_turn_trajectories_are_unchanged(tiny_model_dir, tmp_path):
    """A mask of all ones (the default) gives the gradient of an explicit all-ones mask."""
    trainer = _trainer(tiny_model_dir, tmp_path)
    plain = [Trajectory(f"0-{k}", 0, "0", [1, 2, 3], [10 + k, 11, 12], [-4.0] * 3, [0] * 3, 0, reward=float(k))
             for k in range(2)]
    explicit = copy.deepcopy(plain)
    for t in explicit:
        t.loss_mask = [1, 1, 1]
    assert plain[0].loss_mask is None and plain[0].loss_weights() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(_grad(trainer, plain)[0], _grad(trainer, explicit)[0], rtol=0, atol=0)
