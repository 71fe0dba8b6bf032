"""Every objective the configuration offers trains, and its gradient is the formula's: real steps of the
tiny model, one process and two FSDP2 ranks (gloo).

- every algorithm.loss x algorithm.proximal x trainer.pack_sequences x (K = 1, K > 1) on a batch with
  non-zero advantages: the loss is finite and the weights move (coupled PPO crashed on any non-zero
  advantage before: pi_prox was read from the batch as a dict);
- the gradient of every algorithm.agg_mode, packed and padded, over several micro-batches and ranks,
  against the formula written out with a fresh model (seq-mean-token-mean on a packed row averaged
  all its sequences as one before: 0.91 of the largest gradient entry off).
"""

import itertools
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rollout.trajectory import Trajectory
from tests.helpers import formula_gradient, fsdp_gradients, long_tail_batch, named_grads, on_policy, policy_step

BASE = ["trainer.batch_size=6", "trainer.group_size=3", "algorithm.advantage=dr_grpo", "trainer.grad_clip=1e9"]


# long-tail response lengths (1 to 40 tokens): the two aggregations differ by a lot; every advantage non-zero
_batch = long_tail_batch


def _advantages(trajs):
    means = {g: sum(t.reward for t in trajs if t.group_id == g) / 3 for g in {t.group_id for t in trajs}}
    return [t.reward - means[t.group_id] for t in trajs]


COMBINATIONS = list(itertools.product(["decoupled_ppo", "ppo"], ["recompute", "ewma"], [True, False], [1, 3]))


@pytest.mark.parametrize("loss,proximal,packed,k", COMBINATIONS,
                         ids=[f"{a}-{b}-{'packed' if c else 'padded'}-K{d}" for a, b, c, d in COMBINATIONS])
def test_every_objective_trains_on_a_batch_with_non_zero_advantages(tiny_model_dir, tmp_path, loss, proximal, packed, k):
    step = policy_step(tiny_model_dir, tmp_path, *BASE, "trainer.lr=1e-3", f"algorithm.loss={loss}",
                       f"algorithm.proximal={proximal}", f"trainer.pack_sequences={str(packed).lower()}",
                       f"trainer.num_minibatches={k}", "trainer.micro_batch_size=2",
                       "trainer.max_tokens_per_micro_batch=32", "algorithm.behav_weight_cap=null")
    before = [p.detach().clone() for p in step.model.parameters()]
    metrics = step.train_step(_batch())  # off-policy: behaviour log-probs near -9.5, the model's near -10.8
    assert metrics["train/updates"] == k and metrics["train/skipped_updates"] == 0
    assert metrics["train/active_frac"] == 1.0
    assert torch.isfinite(torch.tensor(metrics["loss/policy"])) and metrics["loss/policy"] != 0
    assert max((p.detach() - b).abs().max().item() for p, b in zip(step.model.parameters(), before)) > 1e-4
    if loss == "ppo":  # coupled: pi_prox = pi_behav, so no behaviour/proximal gap at all
        assert metrics["policy/behav_kl"] == 0.0 and metrics["policy/behav_ess"] == pytest.approx(1.0)
    else:  # pi_prox (the model, ~-10.8) far from pi_behav (~-9.5): w ~ e^-1.3, uneven over the tokens
        assert metrics["policy/behav_kl"] > 0.05 and 0 < metrics["policy/behav_ess"] < 1.0


def _assert_formula(grads: dict, expected: dict, what: str) -> None:
    scale = max(g.abs().max().item() for g in expected.values())
    assert scale > 0
    worst = max((grads[n] - expected[n]).abs().max().item() for n in expected)
    assert worst <= 1e-5 * scale, f"{what}: off by {worst / scale:.3g} of the largest gradient entry"


RUNS = [(f"{agg}-{layout}", [*BASE, f"algorithm.agg_mode={agg}", f"trainer.pack_sequences={str(layout == 'packed').lower()}",
                             "trainer.max_tokens_per_micro_batch=24", "trainer.micro_batch_size=2"])
        for agg in ("token-mean", "seq-mean-token-mean") for layout in ("packed", "padded")]


@pytest.fixture(scope="module")
def batch_and_formula(tiny_model_dir, tmp_path_factory):
    """The batch made on-policy (w = 1, u = 1 at the only update) and the formula's gradient per agg_mode."""
    step = policy_step(tiny_model_dir, tmp_path_factory.mktemp("onpolicy"), *BASE, "trainer.pack_sequences=false")
    batch = on_policy(step, _batch())
    temperature = step.cfg.rollout.temperature
    expected = {agg: formula_gradient(tiny_model_dir, batch, _advantages(batch), agg, temperature)
                for agg in ("token-mean", "seq-mean-token-mean")}
    return batch, expected


@pytest.mark.parametrize("name,overrides", RUNS, ids=[name for name, _ in RUNS])
def test_gradient_of_every_agg_mode_is_the_formula_on_one_rank(tiny_model_dir, tmp_path, batch_and_formula, name,
                                                              overrides):
    batch, expected = batch_and_formula
    step = policy_step(tiny_model_dir, tmp_path, *overrides)
    step.optimizer.step = lambda: None
    metrics = step.train_step([Trajectory(**t.__dict__) for t in batch])
    assert metrics["train/micro_batches"] >= 3  # several micro-batches: 78 tokens by a budget of 24, or by twos
    _assert_formula(named_grads(step.model), expected[name.rsplit("-", 1)[0]], name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradient_of_every_agg_mode_is_the_formula_on_two_fsdp_ranks(tiny_model_dir, tmp_path, batch_and_formula):
    batch, expected = batch_and_formula
    mp.spawn(fsdp_gradients, args=(2, _free_port(), tiny_model_dir, str(tmp_path), RUNS, batch), nprocs=2, join=True)
    for name, _ in RUNS:
        grads = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        _assert_formula(grads, expected[name.rsplit("-", 1)[0]], f"{name} on two ranks")
