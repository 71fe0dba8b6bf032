"""Reward models: the Bradley-Terry loss by hand, scoring at the last real token in batches by a token
budget, packed rows against padded ones, the running normalisation."""

import math

import pytest
import torch

from rewards.reward_model import RunningNorm, load_reward_model, pad_right, reward_forward, score_sequences, token_budget_batches
from trainer.losses import bradley_terry_loss


def test_bradley_terry_loss_hand_values():
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # differences 1 and -1: (softplus(-1) + softplus(1)) / 2 = (0.313262 + 1.313262) / 2 = 0.813262
    loss, sums = bradley_terry_loss(r_c, r_r)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    assert sums["correct"].item() == 1 and sums["margin"].item() == 0.0 and sums["pairs"].item() == 2
    # margins 0.5: logits 0.5 and -1.5 -> (softplus(-0.5) + softplus(1.5)) / 2 = (0.474077 + 1.701413) / 2
    loss, _ = bradley_terry_loss(r_c, r_r, margin=torch.tensor([0.5, 0.5]))
    assert loss.item() == pytest.approx(1.087745, abs=1e-6)
    # centering 0.1: (r_c + r_r)^2 = 9 and 1, mean 5 -> + 0.5
    loss, _ = bradley_terry_loss(r_c, r_r, center_coef=0.1)
    assert loss.item() == pytest.approx(1.313262, abs=1e-6)
    # finite far from 0 (softplus, not log(sigmoid)): a difference of -200 costs 200
    loss, _ = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert loss.item() == pytest.approx(200.0)
    # the gradient pushes the chosen reward up and the rejected one down: d/dr_c = -sigmoid(-d) / N
    r_c = torch.tensor([2.0, 0.0], requires_grad=True)
    r_r = torch.tensor([1.0, 1.0], requires_grad=True)
    bradley_terry_loss(r_c, r_r)[0].backward()
    expected = [-1 / (1 + math.e) / 2, -1 / (1 + math.exp(-1)) / 2]
    torch.testing.assert_close(r_c.grad, torch.tensor(expected))
    torch.testing.assert_close(r_r.grad, -torch.tensor(expected))


def test_token_budget_batches_keep_every_index_once_within_the_budget():
    lengths = [5, 50, 7, 7, 300, 12]
    batches = token_budget_batches(lengths, max_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 64 or len(b) == 1  # the 300-token row alone
    assert [4] in batches


@pytest.fixture(scope="module")
def tiny_rm(tiny_model_dir):
    torch.manual_seed(0)
    return load_reward_model(tiny_model_dir, "cpu").eval()


def test_scores_are_the_head_at_the_last_real_token_whatever_the_batching(tiny_rm):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (3, 17, 9, 1, 30)]
    alone = [score_sequences(tiny_rm, [s], pad_id=0)[0] for s in seqs]
    batched = score_sequences(tiny_rm, seqs, pad_id=0, max_tokens=40)
    assert batched == pytest.approx(alone, rel=1e-5, abs=1e-6)
    # the head at the last token of a plain forward pass of the sequence alone
    s = seqs[1]
    with torch.no_grad():
        ids, mask = pad_right([s], 0, "cpu")
        hidden = tiny_rm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        direct = tiny_rm.score(hidden[0, -1]).item()
    assert alone[1] == pytest.approx(direct, rel=1e-5)
    # padding with the EOS id (SmolLM2's pad) does not move the scored position
    eos_padded = score_sequences(tiny_rm, [s, s + [7] * 5], pad_id=s[-1])[0]
    assert eos_padded == pytest.approx(alone[1], rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        score_sequences(tiny_rm, [[]], pad_id=0)


def test_packed_rewards_equal_padded_rewards(tiny_model_dir):
    from trainer.packing import use_packed_attention
    from trainer.rm_train import packed_rewards

    torch.manual_seed(0)
    padded = load_reward_model(tiny_model_dir, "cpu").eval()
    packed = load_reward_model(tiny_model_dir, "cpu").eval()
    packed.load_state_dict(padded.state_dict())
    use_packed_attention(packed)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (4, 21, 2, 13)]
    with torch.no_grad():
        ids, mask = pad_right(seqs, 0, "cpu")
        a = reward_forward(padded, ids, mask)
        b = packed_rewards(packed, seqs, "cpu")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_running_norm_matches_the_sample_statistics():
    norm = RunningNorm()
    norm.update([1.0, 2.0, 3.0])
    norm.update([4.0])
    # mean 2.5, sample std sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5 / 3) = 1.290994
    assert norm.mean == pytest.approx(2.5) and norm.std == pytest.approx(1.290994, abs=1e-6)
    assert norm.normalize([2.5, 3.790994]) == pytest.approx([0.0, 1.0], abs=1e-5)
    again = RunningNorm()
    again.load_state_dict(norm.state_dict())
    assert again.std == norm.std
