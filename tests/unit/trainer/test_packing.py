"""Packed sequences and chunked log-probs (trainer/packing.py, trainer/logprobs.py) against the padded
path: same log-probs, entropy and gradient; micro-batches by a token budget, balanced across ranks."""

import pytest
import torch

from tests.helpers import gradient_of_step, long_tail_batch, policy_step
from trainer.packing import pack, per_trajectory, plan_micro_batches


def _trainer(tiny_model_dir, tmp_path, *overrides):
    return policy_step(tiny_model_dir, tmp_path, "trainer.lr=1e-3", "trainer.batch_size=6", "trainer.group_size=3",
                       "trainer.grad_clip=1e9", *overrides)


_batch = long_tail_batch
_grad = gradient_of_step


def test_packed_logprobs_and_entropy_equal_the_padded_path(tiny_model_dir, tmp_path):
    batch = _batch()
    values = {}
    for packed in (True, False):
        t = _trainer(tiny_model_dir, tmp_path, f"trainer.pack_sequences={str(packed).lower()}")
        tb = t.tensors(batch)
        with torch.no_grad():
            logp, entropy = t.logprobs(tb, with_entropy=True)
        values[packed] = (per_trajectory(logp, batch, tb), per_trajectory(entropy, batch, tb))
    for (lp_a, en_a), (lp_b, en_b) in [(values[True], values[False])]:
        for a, b in zip(lp_a + en_a, lp_b + en_b):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [16, 64, 8192])
def test_packed_gradient_equals_the_padded_gradient(tiny_model_dir, tmp_path, budget):
    # budget 16: most trajectories alone, the 40-token one over the budget in a micro-batch of its own;
    # 8192: the whole batch in one row
    packed, m_packed = _grad(_trainer(tiny_model_dir, tmp_path, f"trainer.max_tokens_per_micro_batch={budget}"), _batch())
    padded, m_padded = _grad(_trainer(tiny_model_dir, tmp_path, "trainer.pack_sequences=false",
                                      "trainer.micro_batch_size=2"), _batch())
    scale = padded.abs().max().item()
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5 * scale)
    for key in ("loss/policy", "policy/entropy", "policy/grad_norm"):
        assert m_packed[key] == pytest.approx(m_padded[key], rel=1e-5), key


def test_activation_checkpointing_does_not_change_the_gradient(tiny_model_dir, tmp_path):
    plain, _ = _grad(_trainer(tiny_model_dir, tmp_path), _batch())
    trainer = _trainer(tiny_model_dir, tmp_path, "trainer.activation_checkpointing=true")
    assert trainer.model.is_gradient_checkpointing
    ac, _ = _grad(trainer, _batch())
    torch.testing.assert_close(ac, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


def test_a_packed_row_has_no_padding_and_restarts_positions(tiny_model_dir):
    batch = _batch()[:3]
    pb = pack(batch, torch.tensor([1.0, -1.0, 0.5]), torch.device("cpu"))
    lengths = [t.num_tokens for t in batch]
    assert pb.ids.shape == (1, sum(lengths)) and pb.bounds == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert pb.positions[0].tolist() == [i for n in lengths for i in range(n)]
    assert pb.targets.tolist() == [tok for t in batch for tok in t.response_ids]
    # the output at the last prompt position predicts the first response token
    first = len(batch[0].prompt_ids) - 1
    assert pb.predict_at[0].item() == first and pb.ids[0, first + 1].item() == batch[0].response_ids[0]
    assert pb.advantages[0].tolist() == [1.0] * 1 + [-1.0] * 7 + [0.5] * 40


def test_micro_batches_respect_the_budget_and_balance_the_ranks():
    lengths = [50, 10, 400, 30, 30, 200, 90, 5, 120, 60]
    active = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    plans = [plan_micro_batches(lengths, active, 2, rank, max_tokens=256) for rank in range(2)]
    assert len(plans[0]) == len(plans[1])  # every rank runs the same number of passes
    seen = sorted(i for plan in plans for mb in plan if mb for i in mb)
    assert seen == active  # each trajectory exactly once
    totals = [sum(lengths[i] for mb in plan if mb for i in mb) for plan in plans]
    assert abs(totals[0] - totals[1]) <= max(lengths)  # balanced (longest-first to the lightest rank)
    for plan in plans:
        for mb in plan:
            if mb and len(mb) > 1:
                assert sum(lengths[i] for i in mb) <= 256  # only a lone over-budget trajectory may exceed it
    # one rank: everything in as few rows as first-fit decreasing gives
    (single,) = [plan_micro_batches(lengths, active, 1, 0, max_tokens=4096)]
    assert single == [active]


def test_chunked_logprobs_keep_no_vocabulary_sized_tensor_for_backward():
    """The chunked path saves the hidden states and the head weight for backward, never (R, V) logits."""
    from trainer.logprobs import token_logprobs_from_hidden
    from trainer.losses import token_logprobs

    R, H, V = 512, 32, 4096
    h = torch.randn(R, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(V, (R,))
    saved = []

    def pack_hook(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        token_logprobs_from_hidden(h, w, targets, 0.8, chunk=128)[0].sum()
    chunked = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        token_logprobs((h @ w.T) / 0.8, targets).sum()
    full = sum(saved)
    assert chunked <= (R * H + V * H) * 4 + R * 16  # h, W, targets, lse
    assert full >= R * V * 4  # the full path keeps at least one (R, V) float32 tensor


def test_step_reports_its_layout_and_time_breakdown_and_profiles_on_request(tiny_model_dir, tmp_path):
    packed = _trainer(tiny_model_dir, tmp_path, "trainer.profile_steps=[1]", "trainer.max_tokens_per_micro_batch=64")
    m = packed.train_step(_batch())
    assert m["train/padding_frac"] == 0.0 and m["train/micro_batches"] >= 2
    assert m["train/tokens_per_micro_batch"] <= 64 or m["train/micro_batches"] > 1
    parts = m["time/train_batch_s"] + m["time/train_prox_s"] + m["time/train_update_s"]
    assert 0 < parts <= m["time/train_s"]
    table = (tmp_path / "profile" / "trainer_step_0001_rank0.txt").read_text()
    assert "aten::" in table and (tmp_path / "profile" / "trainer_step_0001_rank0.json").exists()
    # the padded layout of the same long-tail batch computes mostly padding: what packing removes
    padded = _trainer(tiny_model_dir, tmp_path, "trainer.pack_sequences=false", "trainer.micro_batch_size=3")
    assert padded.train_step(_batch())["train/padding_frac"] > 0.3
