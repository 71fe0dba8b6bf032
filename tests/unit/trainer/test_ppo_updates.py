"""Several PPO updates per batch (trainer.num_minibatches, trainer.ppo_epochs), dropout in the no-grad
passes, masked truncations and skipped steps, on real trainer steps of the tiny model."""

import pytest
import torch

from rollout.trajectory import Trajectory
from tests.helpers import gradient_of_step, on_policy, policy_step


def _trainer(tiny_model_dir, tmp_path, *overrides):
    return policy_step(tiny_model_dir, tmp_path, "trainer.lr=1e-3", "trainer.batch_size=8", "trainer.group_size=4",
                       "trainer.micro_batch_size=3", "algorithm.advantage=dr_grpo", *overrides)


def _batch(groups=2, finish_reason="stop"):
    """`groups` groups of four responses of different lengths; rewards 0/1 (two of each per group)."""
    g = torch.Generator().manual_seed(7)
    trajs = []
    for group in range(groups):
        prompt = torch.randint(5, 500, (3 + 2 * group,), generator=g).tolist()
        for k in range(4):
            resp = torch.randint(5, 500, (2 + k + group,), generator=g).tolist()
            behav = (-4.0 - torch.rand(len(resp), generator=g)).tolist()
            trajs.append(Trajectory(f"{group}-{k}", group, str(group), prompt, resp, behav, [0] * len(resp), 0,
                                    reward=float((k + group) % 2), finish_reason=finish_reason))
    return trajs


_on_policy = on_policy


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_one_update_per_batch_is_the_single_update_of_the_whole_batch(tiny_model_dir, tmp_path):
    """K = 1: the step (padded micro-batches of 3, gradients accumulated) against the same update written
    out here on a fresh copy of the model: the whole batch in one padded pass, the loss of the decoupled
    objective over every token, clip, AdamW. Same gradient to float noise; the same parameters to well
    under one learning rate (Adam turns noise in near-zero gradients into steps of up to lr)."""
    from transformers import AutoModelForCausalLM

    from trainer.losses import policy_loss
    from trainer.model import token_logprobs_of
    from trainer.packing import pad

    trainer = _trainer(tiny_model_dir, tmp_path, "trainer.pack_sequences=false")
    cfg, alg = trainer.cfg, trainer.cfg.algorithm
    batch = _batch()
    step_grad, metrics = gradient_of_step(_trainer(tiny_model_dir, tmp_path, "trainer.pack_sequences=false"), _batch())
    trainer.train_step(batch)

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref.train()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=cfg.trainer.lr, betas=(cfg.trainer.adam_beta1, cfg.trainer.adam_beta2),
                                  weight_decay=cfg.trainer.weight_decay)
    adv = torch.tensor([t.reward for t in batch]) - 0.5  # dr_grpo: every group's rewards are 0, 1, 0, 1 (or 1, 0, 1, 0)
    whole = pad(batch, adv, torch.device("cpu"))
    logp, _ = token_logprobs_of(ref, whole, cfg.rollout.temperature)
    loss, _ = policy_loss(logp, logp.detach(), whole.behav, whole.advantages, whole.mask, eps_low=alg.eps_low,
                          eps_high=alg.eps_high, behav_weight_cap=alg.behav_weight_cap, cap_mode=alg.behav_weight_cap_mode,
                          loss_denominator=whole.mask.sum().item())
    loss.backward()
    ref_grad = torch.cat([p.grad.flatten() for p in ref.parameters()])
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.trainer.grad_clip).item()
    optimizer.step()

    torch.testing.assert_close(step_grad, ref_grad, rtol=1e-5, atol=1e-6 * ref_grad.abs().max().item())
    assert ref_grad.abs().max() > 0
    assert metrics["train/updates"] == 1
    assert metrics["loss/policy"] == pytest.approx(loss.item(), rel=1e-5)
    assert metrics["policy/grad_norm"] == pytest.approx(norm, rel=1e-5)
    initial = _params(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    moved = 0.0
    for ours, theirs, start in zip(trainer.model.parameters(), ref.parameters(), initial):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=0.05 * cfg.trainer.lr)
        moved = max(moved, (theirs.detach() - start).abs().max().item())
    assert moved > 0.5 * cfg.trainer.lr  # the update did move the weights, by about lr


def test_with_one_update_and_recompute_the_clip_never_acts(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, "trainer.lr=1e-2")
    metrics = trainer.train_step(_on_policy(trainer, _batch()))
    # pi_theta = pi_prox at the only update: u = 1 exactly, so no clip and no KL
    assert metrics["policy/clipfrac"] == 0.0 and metrics["policy/approx_kl"] == 0.0


def test_second_minibatch_sees_u_not_one_and_the_clip_acts_where_the_numbers_say(tiny_model_dir, tmp_path):
    """K = 2 on groups 0 | 1 (minibatches of four). Update 1 trains on group 0 at u = 1. Update 2 sees
    u = pi_theta1 / pi_prox on group 1, with pi_prox the weights at the start of the step. The expected
    clip is worked out here from theta1 (a K = 1 step on group 0 alone: same data, same denominator,
    same fresh Adam state) and pi_prox (a forward pass before the step)."""
    eps = 0.2
    two = _trainer(tiny_model_dir, tmp_path, "trainer.lr=3e-2", "trainer.num_minibatches=2")
    batch = _on_policy(two, _batch())
    group1 = batch[4:]
    adv = torch.tensor([t.reward for t in group1]) - 0.5  # dr_grpo: group 1's rewards 1, 0, 1, 0, mean 0.5
    tb1 = two.tensors(group1, adv)
    with torch.no_grad():
        prox1 = two.logprobs(tb1)[0]  # (1, R) pi_prox of the second minibatch
    metrics = two.train_step(batch)

    one = _trainer(tiny_model_dir, tmp_path, "trainer.lr=3e-2", "trainer.batch_size=4")
    one.train_step([Trajectory(**{**t.__dict__}) for t in batch[:4]])
    with torch.no_grad():
        theta1 = one.logprobs(tb1)[0]  # (1, R) pi_theta after the first update
    mask = tb1.mask > 0
    u = (theta1 - prox1).exp()
    a = tb1.advantages  # each token's sequence advantage
    clipped = ((a > 0) & (u > 1 + eps)) | ((a < 0) & (u < 1 - eps))
    expected_clipfrac = (clipped & mask).sum().item() / mask.sum().item()
    log_u = (theta1 - prox1)[mask]
    expected_kl = (torch.expm1(log_u) - log_u).mean().item()

    assert expected_clipfrac > 0  # the step size makes the trust region act
    assert metrics["train/updates"] == 2
    # update 1 has clipfrac 0 and approx_kl 0, so the max over updates is update 2's
    assert metrics["policy/clipfrac_max"] == pytest.approx(expected_clipfrac, abs=1e-9)
    assert metrics["policy/approx_kl_max"] == pytest.approx(expected_kl, rel=1e-4)
    tokens0 = sum(len(t.response_ids) for t in batch[:4])
    tokens1 = mask.sum().item()
    assert metrics["policy/clipfrac"] == pytest.approx(expected_clipfrac * tokens1 / (tokens0 + tokens1), abs=1e-9)


def test_ppo_epochs_repeat_the_minibatches_with_pi_prox_fixed(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, "trainer.lr=1e-2", "trainer.num_minibatches=2", "trainer.ppo_epochs=2")
    metrics = trainer.train_step(_on_policy(trainer, _batch()))
    assert metrics["train/updates"] == 4 and metrics["policy/approx_kl"] > 0
    assert metrics["policy/grad_norm_max"] >= metrics["policy/grad_norm"] > 0


def _train_adapters(trainer):
    """LoRA's B starts at 0, which would hide dropout (B A dropout(x) = 0): give the adapters values."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_no_grad_passes_run_without_dropout(tiny_model_dir, tmp_path):
    # LoRA dropout 0.3 kept for the gradient pass: pi_prox and the reference must still be deterministic
    trainer = _trainer(tiny_model_dir, tmp_path, "model.lora.rank=4", "model.lora.dropout=0.3",
                       "trainer.disable_dropout=false", "algorithm.kl_coef=0.1")
    _train_adapters(trainer)
    tensors = [trainer.tensors(_batch())]
    first = trainer.proximal_logprobs(tensors)[0]
    second = trainer.proximal_logprobs(tensors)[0]
    assert torch.equal(first, second)
    assert torch.equal(trainer.reference_logprobs(tensors[0]), trainer.reference_logprobs(tensors[0]))
    assert trainer.model.training  # back in train mode for the gradient pass


def test_disable_dropout_makes_an_unchanged_policy_give_u_one(tiny_model_dir, tmp_path):
    # trainer.disable_dropout (default) turns every dropout off, LoRA's included: at unchanged weights the
    # first update sees u = 1 exactly (approx_kl and clipfrac 0), whatever the configured dropout
    trainer = _trainer(tiny_model_dir, tmp_path, "model.lora.rank=4", "model.lora.dropout=0.3", "trainer.lr=1e-2")
    _train_adapters(trainer)
    metrics = trainer.train_step(_on_policy(trainer, _batch()))
    assert metrics["policy/approx_kl"] == 0.0 and metrics["policy/clipfrac"] == 0.0


def test_a_skipped_step_does_not_move_the_advantage_statistics(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, "algorithm.adv_norm_span=4", "trainer.inject_nan_steps=[1]")
    metrics = trainer.train_step(_batch())
    assert metrics["train/skipped_steps"] == 1 and trainer.adv_norm.num_updates == 0
    metrics = trainer.train_step(_batch())
    assert metrics["train/skipped_steps"] == 0 and trainer.adv_norm.num_updates == 1


def test_truncated_responses_get_no_loss_with_mask_truncated(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, "algorithm.mask_truncated=true")
    before = _params(trainer.model)
    metrics = trainer.train_step(_batch(finish_reason="length"))
    # every response was cut at the limit: no update at all, the rewards still in the metrics
    assert metrics["train/updates"] == 0 and metrics["train/active_frac"] == 0
    assert metrics["reward/mean"] == 0.5 and metrics["rollout/truncated_frac"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(_params(trainer.model), before))

    # one truncated response among finished ones: it adds no loss and leaves the token-mean denominator.
    # Reference: the same batch unmasked with that response's advantage forced to 0 (no loss, but its
    # tokens in the denominator), rescaled by (all tokens / tokens of the others).
    grads = []
    for masked in (True, False):
        t = _trainer(tiny_model_dir, tmp_path, f"algorithm.mask_truncated={str(masked).lower()}", "trainer.grad_clip=1e9")
        batch = _batch()
        if masked:
            batch[0].finish_reason = "length"
        else:
            compute = t.advantages

            def zero_first(trajs, baselines, compute=compute):
                adv, norm = compute(trajs, baselines)
                adv = adv.clone()
                adv[0] = 0.0
                return adv, norm

            t.advantages = zero_first
        grads.append(gradient_of_step(t, batch)[0])
    tokens = [len(t.response_ids) for t in _batch()]
    scale = sum(tokens) / (sum(tokens) - tokens[0])
    torch.testing.assert_close(grads[0], grads[1] * scale, rtol=1e-5, atol=1e-7)
    assert grads[0].abs().max() > 0
