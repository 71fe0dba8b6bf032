"""Batch-size-invariance rules and the parameter EWMA of trainer/invariance.py (docs/design.md section 4)."""

import dataclasses
import math

import pytest
import torch

from trainer.invariance import (
    EWMAParams,
    derive_invariant_hparams,
    ewma_beta_from_span,
    ewma_center_of_mass,
    ewma_span,
)


def test_center_of_mass_and_span():
    # 1 / (1 - beta) - 1:  beta 0 -> 0,  0.5 -> 1,  0.889 -> 9.009009 - 1 = 8.009009 (Hilton's ~8 steps)
    assert ewma_center_of_mass(0.0) == 0.0
    assert ewma_center_of_mass(0.5) == pytest.approx(1.0)
    assert ewma_center_of_mass(0.889) == pytest.approx(8.009009, abs=1e-6)
    # span 2 / (1 - beta) - 1:  beta 0.5 -> 3;  inverse 1 - 2 / (3 + 1) = 0.5
    assert ewma_span(0.5) == pytest.approx(3.0)
    assert ewma_beta_from_span(3.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ewma_center_of_mass(1.0)


def _derive(batch_size, beta_ref=0.5, adapt=True):
    return derive_invariant_hparams(
        64, batch_size, lr_ref=1e-6, ewma_beta_ref=beta_ref, adv_norm_span_ref=100.0,
        adam_betas_ref=(0.9, 0.999), adapt_adam_betas=adapt,
    )


def test_c_equal_one_changes_nothing():
    h = _derive(64, beta_ref=0.889)
    assert h.c == 1.0 and h.lr == pytest.approx(1e-6)
    assert h.ewma_beta == pytest.approx(0.889)
    assert h.adv_norm_span == 100.0 and h.adam_betas == pytest.approx((0.9, 0.999))


def test_c_four_smaller_batch():
    h = _derive(16)  # c = 64 / 16 = 4
    assert h.c == 4.0
    assert h.lr == pytest.approx(5e-7)  # 1e-6 / sqrt(4)
    # centre of mass 1 step (beta_ref 0.5) x 4 = 4:  beta = 1 - 1 / (4 * 1 + 1) = 0.8
    assert h.ewma_beta == pytest.approx(0.8) and h.ewma_center_of_mass == pytest.approx(4.0)
    # span 100 x 4 = 400:  beta = 1 - 2 / 401 = 0.995012
    assert h.adv_norm_span == pytest.approx(400.0) and h.adv_norm_beta == pytest.approx(0.995012, abs=1e-6)
    # 0.9^(1/4) = 0.974004,  0.999^(1/4) = 0.999750
    assert h.adam_betas == pytest.approx((0.974004, 0.999750), abs=1e-6)


def test_c_quarter_larger_batch():
    h = _derive(256)  # c = 64 / 256 = 1/4
    assert h.c == 0.25
    assert h.lr == pytest.approx(2e-6)  # 1e-6 / sqrt(1/4)
    # centre of mass 1 x 1/4 = 0.25:  beta = 1 - 1 / (0.25 + 1) = 0.2
    assert h.ewma_beta == pytest.approx(0.2) and h.ewma_center_of_mass == pytest.approx(0.25)
    assert h.adv_norm_span == pytest.approx(25.0)  # 100 / 4
    # 0.9^4 = 0.6561,  0.999^4 = 0.996006
    assert h.adam_betas == pytest.approx((0.6561, 0.996006), abs=1e-6)


def test_hilton_default_beta_scaled_and_betas_kept_when_not_adapted():
    h = _derive(16, beta_ref=0.889, adapt=False)
    # centre of mass 8.009009 x 4 = 32.036036:  beta = 1 - 1 / 33.036036 = 0.969730
    assert h.ewma_beta == pytest.approx(0.969730, abs=1e-6)
    assert h.ewma_center_of_mass == pytest.approx(4 * ewma_center_of_mass(0.889))
    assert h.adam_betas == (0.9, 0.999)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.lr = 1.0


def test_derive_errors():
    with pytest.raises(ValueError, match="reference_batch_size"):
        _derive(0)
    with pytest.raises(ValueError, match="span"):  # 100 x 64 / 8192 = 0.78 steps
        _derive(8192)


def test_ewma_params_bias_correction_hand_values():
    p = torch.zeros(1)
    ema = EWMAParams([p], beta=0.5)
    with pytest.raises(RuntimeError, match="update"):
        ema.averaged()
    for value, expected in [
        (2.0, 2.0),  # raw = 0.5 * 2 = 1;            / (1 - 0.5)   = 2       (the first value exactly)
        (4.0, 10.0 / 3.0),  # raw = 0.5 + 2 = 2.5;   / (1 - 0.25)  = 3.333333 = (0.5 * 2 + 4) / 1.5
        (8.0, 6.0),  # raw = 1.25 + 4 = 5.25;         / (1 - 0.125) = 6
    ]:
        p.fill_(value)
        ema.update([p])
        assert ema.averaged()[0].item() == pytest.approx(expected)
    assert ema.num_updates == 3


def test_ewma_params_closed_form_and_constant_input():
    beta, n = 0.9, 10
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(3, 2, generator=g) for _ in range(n)]
    p = torch.zeros(3, 2)
    ema = EWMAParams([p], beta)
    for theta in thetas:
        p.copy_(theta)
        ema.update([p])
    # sum_k beta^(n-k) (1 - beta) theta_k / (1 - beta^n)
    closed = sum(beta ** (n - k) * (1 - beta) * thetas[k - 1] for k in range(1, n + 1)) / (1 - beta**n)
    torch.testing.assert_close(ema.averaged()[0], closed)
    # bias correction makes a constant parameter average to itself at every n
    const = EWMAParams([torch.full((2,), 3.0)], 0.99)
    for _ in range(5):
        const.update([torch.full((2,), 3.0)])
        torch.testing.assert_close(const.averaged()[0], torch.full((2,), 3.0))


def test_ewma_params_on_a_module_state_and_copy_to():
    model = torch.nn.Linear(3, 2)
    ema = EWMAParams(model.parameters(), beta=0.8)
    assert [r.shape for r in ema.state_dict()["avg"]] == [p.shape for p in model.parameters()]  # one copy
    ema.update(model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model.parameters())
    other = EWMAParams(torch.nn.Linear(3, 2).parameters(), beta=0.8)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 2
    for a, b in zip(other.averaged(), ema.averaged()):
        torch.testing.assert_close(a, b)
    prox = torch.nn.Linear(3, 2)
    ema.copy_to(prox.parameters())
    # two updates, theta then theta + 1:  (0.8 * 0.2 * theta + 0.2 * (theta + 1)) / (1 - 0.64) = theta + 0.2 / 0.36
    for q, p in zip(prox.parameters(), model.parameters()):
        torch.testing.assert_close(q.detach(), p.detach() - 1.0 + 0.2 / 0.36)
    with pytest.raises(ValueError, match="does not match"):
        EWMAParams([torch.zeros(5)], 0.8).load_state_dict(ema.state_dict())


def test_ewma_params_float32_accumulator_for_bf16():
    p = torch.ones(4, dtype=torch.bfloat16)
    ema = EWMAParams([p], beta=0.999, dtype=torch.float32)
    ema.update([p])
    assert ema.averaged()[0].dtype == torch.float32
    assert ema.averaged()[0].tolist() == pytest.approx([1.0] * 4)
    assert math.isclose(ema.beta, 0.999)


def test_minibatches_scale_the_per_update_rules_by_the_minibatch_ratio():
    # reference: B_ref = 64 in K_ref = 1 update; this run: B = 64 in K = 4 updates of 16.
    # Per optimizer update the batch shrank by c = 64 / 16 = 4 (lr, Adam betas, EWMA centre of mass);
    # per training step it did not (c_batch = 1: the advantage-norm span stays 100 steps)
    h = derive_invariant_hparams(64, 64, lr_ref=1e-6, ewma_beta_ref=0.5, adv_norm_span_ref=100.0,
                                 adapt_adam_betas=True, num_minibatches=4, reference_num_minibatches=1)
    assert h.c == 4.0 and h.c_batch == 1.0
    assert h.lr == pytest.approx(5e-7) and h.ewma_center_of_mass == pytest.approx(4.0)
    assert h.adv_norm_span == pytest.approx(100.0)
    # the same K in both (the default): B = 16 in 2 updates of 8 against 64 in 2 of 32 -> c = c_batch = 4
    h = derive_invariant_hparams(64, 16, lr_ref=1e-6, ewma_beta_ref=0.5, adv_norm_span_ref=100.0, num_minibatches=2)
    assert h.c == 4.0 and h.c_batch == 4.0 and h.adv_norm_span == pytest.approx(400.0)
