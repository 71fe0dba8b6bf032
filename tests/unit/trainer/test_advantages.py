"""Group advantages and the EWMA normaliser of trainer/advantages.py (docs/design.md sections 3 and 4)."""

import math

import pytest
import torch

from trainer.advantages import EWMANormalizer, group_advantages

# three prompts with non-contiguous, interleaved ids:
#   group 7:  rewards 1, 0, 1, 0   (positions 0, 2, 4, 6)
#   group 3:  rewards 2, 4         (positions 1, 5)
#   group 11: reward 5             (position 3, a group of one)
REWARDS = torch.tensor([1.0, 2.0, 0.0, 5.0, 1.0, 4.0, 0.0])
GROUPS = torch.tensor([7, 3, 7, 11, 7, 3, 7])


def test_grpo_hand_values():
    adv = group_advantages(REWARDS, GROUPS, "grpo")
    # group 7: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.577350 -> +-0.5 / 0.577350 = +-0.866025
    # group 3: mean 3, sample std sqrt((1 + 1) / 1) = 1.414214    -> -+1 / 1.414214 = -+0.707107
    # group 11: one sample, std 0 -> 0 / 1e-6 = 0 (not nan)
    expected = torch.tensor([0.866025, -0.707107, -0.866025, 0.0, 0.866025, 0.707107, -0.866025])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)


def test_grpo_equal_rewards_give_zero_not_nan():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 0, 0]), "grpo")
    assert torch.equal(adv, torch.zeros(3))


def test_dr_grpo_hand_values():
    adv = group_advantages(REWARDS, GROUPS, "dr_grpo")
    # r - mean_g: group 7 +-0.5, group 3 -+1, group 11 0
    torch.testing.assert_close(adv, torch.tensor([0.5, -1.0, -0.5, 0.0, 0.5, 1.0, -0.5]))


def test_rloo_hand_values():
    adv = group_advantages(REWARDS, GROUPS, "rloo")
    # group 7: r = 1 -> 1 - (0 + 1 + 0) / 3 = 2/3;  r = 0 -> 0 - (1 + 1 + 0) / 3 = -2/3
    # group 3: 2 - 4 = -2;  4 - 2 = 2
    # group 11: no other sample -> 0
    t = 2.0 / 3.0
    torch.testing.assert_close(adv, torch.tensor([t, -2.0, -t, 0.0, t, 2.0, -t]))


def test_remax_hand_values():
    # baseline in ascending group id order: id 3 -> 3.0, id 7 -> 0.5, id 11 -> 6.0 (greedy rewards)
    adv = group_advantages(REWARDS, GROUPS, "remax", baseline=torch.tensor([3.0, 0.5, 6.0]))
    # group 7: 1 - 0.5 = 0.5, 0 - 0.5 = -0.5;  group 3: 2 - 3 = -1, 4 - 3 = 1;  group 11: 5 - 6 = -1
    torch.testing.assert_close(adv, torch.tensor([0.5, -1.0, -0.5, -1.0, 0.5, 1.0, -0.5]))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="baseline of shape \\(3,\\)"):
        group_advantages(REWARDS, GROUPS, "remax")
    with pytest.raises(ValueError, match="baseline of shape \\(3,\\)"):
        group_advantages(REWARDS, GROUPS, "remax", baseline=torch.zeros(7))
    with pytest.raises(ValueError, match="algorithm.advantage"):
        group_advantages(REWARDS, GROUPS, "ppo")
    with pytest.raises(ValueError, match="must both be"):
        group_advantages(REWARDS, GROUPS[:3], "grpo")


def test_ewma_normalizer_hand_values():
    norm = EWMANormalizer(span=3)  # beta = 1 - 2 / (3 + 1) = 0.5
    assert norm.beta == 0.5
    with pytest.raises(RuntimeError, match="update"):
        norm.normalize(torch.ones(2))
    norm.update(torch.tensor([1.0, 3.0]))
    # m1 = 2, m2 = (1 + 9) / 2 = 5;  raw = 0.5 * 2 = 1, 0.5 * 5 = 2.5;  / (1 - 0.5) -> mean 2, E[x^2] 5
    # var = 5 - 2^2 = 1
    assert norm.mean == pytest.approx(2.0) and norm.var == pytest.approx(1.0)
    torch.testing.assert_close(norm.normalize(torch.tensor([3.0, 1.0])), torch.tensor([1.0, -1.0]))
    norm.update(torch.tensor([5.0, 5.0]))
    # m1 = 5, m2 = 25;  raw mean = 0.5 * 1 + 0.5 * 5 = 3, raw sq = 0.5 * 2.5 + 0.5 * 25 = 13.75
    # / (1 - 0.25): mean 4 (= (0.5 * 2 + 5) / 1.5), E[x^2] = 18.333333, var = 18.333333 - 16 = 2.333333
    assert norm.mean == pytest.approx(4.0) and norm.var == pytest.approx(7.0 / 3.0)
    torch.testing.assert_close(norm.normalize(torch.tensor([4.0 + math.sqrt(7.0 / 3.0)])), torch.tensor([1.0]))


def test_ewma_normalizer_span_one_is_per_batch_and_state_roundtrip():
    norm = EWMANormalizer(span=1)  # beta = 0: this batch's statistics only (population variance)
    norm.update(torch.tensor([10.0, 10.0]))
    norm.update(torch.tensor([1.0, 2.0, 3.0]))
    assert norm.mean == pytest.approx(2.0) and norm.var == pytest.approx(2.0 / 3.0)

    a = EWMANormalizer(span=20)
    for x in ([1.0, 2.0], [0.5, -3.0, 2.0], [4.0]):
        a.update(torch.tensor(x))
    b = EWMANormalizer(span=5)
    b.load_state_dict(a.state_dict())
    assert b.beta == a.beta and b.num_updates == 3
    x = torch.tensor([0.0, 1.0, 7.0])
    torch.testing.assert_close(b.normalize(x), a.normalize(x))
    with pytest.raises(ValueError, match="span"):
        EWMANormalizer(span=0.5)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value,size", [(0.7, 16), (0.3, 8), (0.1, 5), (1.0 / 3.0, 12)])
def test_all_equal_group_gets_exactly_zero(method, value, size):
    # in float32 the mean of [0.7] * 16 is not 0.7: grpo divided that rounding by (std + 1e-6) and gave
    # every member +0.106 (+0.029 for [0.3] * 8). The group beside it keeps its usual advantages.
    rewards = torch.tensor([value] * size + [1.0, 0.0])
    groups = torch.tensor([0] * size + [1, 1])
    adv = group_advantages(rewards, groups, method)
    assert torch.equal(adv[:size], torch.zeros(size))
    assert adv[size] > 0 > adv[size + 1]
    assert adv.dtype == torch.float32


def test_normaliser_updated_copy_leaves_the_original_alone():
    norm = EWMANormalizer(span=4)
    norm.update(torch.tensor([1.0, 2.0]))
    before = norm.state_dict()
    new = norm.updated(torch.tensor([10.0, 20.0]))
    assert norm.state_dict() == before and new.num_updates == 2 and new.mean != norm.mean
