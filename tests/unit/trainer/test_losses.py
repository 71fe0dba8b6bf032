"""Decoupled PPO, aggregation, KL estimators and log-prob helpers of trainer/losses.py (docs/design.md section 3)."""

import math

import pytest
import torch

import trainer.losses as losses
from trainer.losses import aggregate, entropy_from_logits, kl_penalty, policy_loss, token_logprobs

INF = float("inf")


def _hand_batch():
    """Two sequences, four valid tokens, two padded positions holding garbage.

    token  pi_behav pi_prox pi_theta  A     w = prox/behav  u = theta/prox
    a      0.5      0.5     0.6       +1    1               1.2
    b      0.25     0.5     0.75      +1    2               1.5
    c      0.5      0.4     0.2       -2    0.8             0.5
    d      0.1      0.8     0.8       +0.5  8               1
    """
    behav = torch.tensor([[0.5, 0.25, 0.5], [0.1, 1.0, 1.0]]).log()  # (2, 3)
    prox = torch.tensor([[0.5, 0.5, 0.4], [0.8, 1.0, 1.0]]).log()
    theta = torch.tensor([[0.6, 0.75, 0.2], [0.8, 1.0, 1.0]]).log()
    adv = torch.tensor([[1.0, 1.0, -2.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # padding garbage must not leak into the loss, the stats or the gradient
    behav[1, 1:] = -INF
    theta[1, 2] = 50.0
    return theta.requires_grad_(), prox, behav, adv, mask


def _call(logp, prox, behav, adv, mask, **kw):
    args = dict(eps_low=0.2, eps_high=0.2, behav_weight_cap=None, cap_mode="clamp", loss_denominator=4.0)
    args.update(kw)
    return policy_loss(logp, prox, behav, adv, mask, **args)


def test_decoupled_hand_values_no_cap():
    logp, prox, behav, adv, mask = _hand_batch()
    loss, s = _call(logp, prox, behav, adv, mask)
    # a: min(1.2*1, clip(1.2)=1.2 *1) = 1.2               L = -1 * 1.2   = -1.2   (tie: not clipped)
    # b: min(1.5*1, 1.2*1)           = 1.2               L = -2 * 1.2   = -2.4   clipped
    # c: min(0.5*-2, clip(0.5)=0.8 *-2) = min(-1, -1.6)  L = -0.8 * -1.6 = 1.28   clipped
    # d: min(1*0.5, 1*0.5)           = 0.5               L = -8 * 0.5   = -4
    # sum = -1.2 - 2.4 + 1.28 - 4 = -6.32;  / 4 tokens = -1.58
    assert loss.item() == pytest.approx(-1.58, abs=1e-6)
    assert s["clipped"].item() == 2
    assert s["capped"].item() == 0
    assert s["tokens"].item() == 4
    # k3 = (u - 1) - ln u:  a 0.2 - ln 1.2 = 0.017678;  b 0.5 - ln 1.5 = 0.094535
    #                       c -0.5 - ln 0.5 = 0.193147;  d 0          sum = 0.305361
    assert s["approx_kl"].item() == pytest.approx(0.305361, abs=1e-5)
    assert all(not v.requires_grad for v in s.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1, 1:].abs().sum() == 0  # padded positions get no gradient


def test_cap_clamp_and_mask():
    logp, prox, behav, adv, mask = _hand_batch()
    clamp, s_clamp = _call(logp, prox, behav, adv, mask, behav_weight_cap=5.0, cap_mode="clamp")
    masked, s_mask = _call(logp, prox, behav, adv, mask, behav_weight_cap=5.0, cap_mode="mask")
    # only d has w = 8 > 5
    # clamp: w_d = 5, L_d = -5 * 0.5 = -2.5;  sum = -1.2 - 2.4 + 1.28 - 2.5 = -4.82;  / 4 = -1.205
    assert clamp.item() == pytest.approx(-1.205, abs=1e-6)
    # mask:  w_d = 0, L_d = 0;               sum = -1.2 - 2.4 + 1.28       = -2.32;  / 4 = -0.58
    assert masked.item() == pytest.approx(-0.58, abs=1e-6)
    assert s_clamp["capped"].item() == 1 and s_mask["capped"].item() == 1
    # a cap above every weight changes nothing
    high, s_high = _call(logp, prox, behav, adv, mask, behav_weight_cap=100.0, cap_mode="mask")
    assert high.item() == pytest.approx(-1.58, abs=1e-6) and s_high["capped"].item() == 0


def test_loss_denominator_is_the_callers():
    logp, prox, behav, adv, mask = _hand_batch()
    # as if this micro-batch were half of a global batch of 8 valid tokens: -6.32 / 8 = -0.79
    loss, _ = _call(logp, prox, behav, adv, mask, loss_denominator=8.0)
    assert loss.item() == pytest.approx(-0.79, abs=1e-6)


def test_seq_mean_token_mean_hand_values():
    logp, prox, behav, adv, mask = _hand_batch()
    loss, _ = _call(logp, prox, behav, adv, mask, agg_mode="seq-mean-token-mean", loss_denominator=2.0)
    # sequence 0: (-1.2 - 2.4 + 1.28) / 3 = -0.773333;  sequence 1: -4 / 1 = -4
    # (-0.773333 - 4) / 2 sequences = -2.386667
    assert loss.item() == pytest.approx(-2.386667, abs=1e-5)


def test_aggregate_modes_and_errors():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token-mean: (1 + 2 + 3 + 4) / 10 (global count) = 1.0; the nan is padding
    assert aggregate(per_token, mask, "token-mean", 10.0).item() == pytest.approx(1.0)
    # seq-mean-token-mean: (6/3 + 4/1) / 3 (global sequences) = 2.0
    assert aggregate(per_token, mask, "seq-mean-token-mean", 3.0).item() == pytest.approx(2.0)
    # an all-padding sequence contributes 0 rather than 0/0
    assert aggregate(per_token, torch.zeros_like(mask), "seq-mean-token-mean", 2.0).item() == 0.0
    with pytest.raises(ValueError, match="agg_mode"):
        aggregate(per_token, mask, "sum", 1.0)
    with pytest.raises(ValueError, match="loss_denominator"):
        aggregate(per_token, mask, "token-mean", 0.0)


def _random_batch(seed=0, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    behav = -torch.rand(B, T, generator=g) * 2 - 0.1  # (B, T) log-probs in (-2.1, -0.1)
    prox = behav + torch.randn(B, T, generator=g) * 0.3
    logp = (prox + torch.randn(B, T, generator=g) * 0.3).requires_grad_()
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return logp, prox, behav, adv, mask


def test_infinite_eps_gives_importance_sampled_policy_gradient():
    logp, prox, behav, adv, mask = _random_batch()
    n = mask.sum().item()
    loss, s = _call(logp, prox, behav, adv, mask, eps_low=INF, eps_high=INF, loss_denominator=n)
    loss.backward()
    # L = -w u A = -(pi_theta / pi_behav) A, so dL/dlogp = -(pi_theta / pi_behav) * A / N per valid token
    expected = -torch.exp(logp.detach() - behav) * adv * mask / n
    torch.testing.assert_close(logp.grad, expected, rtol=1e-6, atol=1e-7)
    assert s["clipped"].item() == 0


def test_on_policy_gives_reinforce_gradient():
    logp, _, _, adv, mask = _random_batch(seed=1)
    same = logp.detach().clone()
    n = mask.sum().item()
    # pi_theta = pi_prox = pi_behav: w = u = 1, no clip active, dL/dlogp = -A / N
    loss, s = _call(logp, same, same, adv, mask, loss_denominator=n)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * mask / n)
    assert s["approx_kl"].item() == 0 and s["clipped"].item() == 0


def test_coupled_equals_decoupled_when_prox_is_behav():
    logp, _, behav, adv, mask = _random_batch(seed=2)
    logp2 = logp.detach().clone().requires_grad_()
    n = mask.sum().item()
    coupled, _ = _call(logp, behav, behav, adv, mask, loss_denominator=n)
    decoupled, _ = _call(logp2, behav.clone(), behav, adv, mask, loss_denominator=n,
                         behav_weight_cap=5.0, cap_mode="mask")  # w = 1 everywhere: the cap never bites
    coupled.backward()
    decoupled.backward()
    torch.testing.assert_close(coupled, decoupled)
    torch.testing.assert_close(logp.grad, logp2.grad)
    # and both equal the textbook PPO-clip (arXiv 1707.06347 eq. 7), CleanRL style
    ratio = torch.exp(logp.detach() - behav)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 0.8, 1.2)
    reference = (torch.maximum(pg1, pg2) * mask).sum() / n
    torch.testing.assert_close(coupled.detach(), reference)


def test_bad_cap_mode():
    logp, prox, behav, adv, mask = _hand_batch()
    with pytest.raises(ValueError, match="cap_mode"):
        _call(logp, prox, behav, adv, mask, cap_mode="drop")


# ---- micro-batch / grad-accumulation / data-parallel invariance (docs/design.md section 3, "Aggregation") ----

V, H, B, T_MAX = 11, 6, 5, 7
LENGTHS = [7, 2, 5, 1, 4]


def _policy_problem():
    g = torch.Generator().manual_seed(0)
    policy = torch.nn.Linear(H, V).double()
    with torch.no_grad():
        policy.weight.copy_(torch.randn(V, H, generator=g))
        policy.bias.copy_(torch.randn(V, generator=g))
    prox_policy = torch.nn.Linear(H, V).double()  # e.g. the EWMA weights: close to, not equal to, theta
    with torch.no_grad():
        prox_policy.weight.copy_(policy.weight + 0.3 * torch.randn(V, H, generator=g))
        prox_policy.bias.copy_(policy.bias)
    x = torch.randn(B, T_MAX, H, generator=g, dtype=torch.float64)  # (B, T, H) hidden states
    targets = torch.randint(0, V, (B, T_MAX), generator=g)  # (B, T)
    mask = torch.zeros(B, T_MAX, dtype=torch.float64)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1.0
    behav = token_logprobs(prox_policy(x).detach(), targets) + 0.5 * torch.randn(B, T_MAX, generator=g)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T_MAX).contiguous()
    return policy, prox_policy, x, targets, mask, behav, adv


def _accumulated_grad(micro_batch_size, agg_mode, ranks=1):
    policy, prox_policy, x, targets, mask, behav, adv = _policy_problem()
    denominator = mask.sum().item() if agg_mode == "token-mean" else float(B)  # global, over every micro-batch
    rank_grads, active = [], {"clipped": 0.0, "capped": 0.0}
    for rank in range(ranks):  # data-parallel ranks: disjoint shards, gradients summed (all-reduce SUM)
        policy.zero_grad()
        shard = list(range(rank, B, ranks))  # (0, 2, 4) and (1, 3) for 2 ranks
        for start in range(0, len(shard), micro_batch_size):
            idx = shard[start:start + micro_batch_size]
            t = int(max(LENGTHS[i] for i in idx))  # pad each micro-batch only to its own longest response
            logp = token_logprobs(policy(x[idx, :t]), targets[idx, :t])  # (b, t)
            with torch.no_grad():
                logp_prox = token_logprobs(prox_policy(x[idx, :t]), targets[idx, :t])
            loss, stats = policy_loss(
                logp, logp_prox, behav[idx, :t], adv[idx, :t], mask[idx, :t],
                eps_low=0.2, eps_high=0.28, behav_weight_cap=1.5, cap_mode="mask",
                loss_denominator=denominator, agg_mode=agg_mode,
            )
            loss.backward()
            active["clipped"] += stats["clipped"].item()
            active["capped"] += stats["capped"].item()
        rank_grads.append(torch.cat([p.grad.flatten().clone() for p in policy.parameters()]))
    return torch.stack(rank_grads).sum(0), active


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_gradient_invariant_to_micro_batching_and_ranks(agg_mode):
    full, active = _accumulated_grad(B, agg_mode)
    assert full.abs().max() > 1e-3  # a real gradient, not trivially zero
    assert active["clipped"] > 0 and active["capped"] > 0  # the clip and the cap both take part
    for mbs, ranks in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        grad, _ = _accumulated_grad(mbs, agg_mode, ranks)
        torch.testing.assert_close(grad, full, rtol=1e-5, atol=1e-12)


# ---- KL, log-probs, entropy ----

def test_kl_estimators_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.3)]])
    logp_ref = torch.tensor([[math.log(0.25), math.log(0.3)]])
    # k1 = ln 0.5 - ln 0.25 = ln 2 = 0.693147;  equal log-probs give 0
    torch.testing.assert_close(kl_penalty(logp, logp_ref, "k1"), torch.tensor([[0.693147, 0.0]]))
    # k3 = exp(ln 0.25 - ln 0.5) - (ln 0.25 - ln 0.5) - 1 = 0.5 + 0.693147 - 1 = 0.193147
    torch.testing.assert_close(kl_penalty(logp, logp_ref, "k3"), torch.tensor([[0.193147, 0.0]]))
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, logp_ref, "k2")


def test_seq_mean_token_mean_of_a_packed_row_is_the_mean_over_its_sequences():
    # three sequences of 1, 3 and 2 response tokens packed in one row (the third has one masked token):
    # (4 / 1 + (1 + 2 + 3) / 3 + 6 / 1) / 3 sequences = (4 + 2 + 6) / 3 = 4. The row read as one
    # sequence would give (4 + 1 + 2 + 3 + 6) / 5 / 3 = 1.066667.
    loss = torch.tensor([[4.0, 1.0, 2.0, 3.0, 6.0, 100.0]])  # (1, R)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    seq = torch.tensor([[0, 1, 1, 1, 2, 2]])
    assert aggregate(loss, mask, "seq-mean-token-mean", 3.0, seq).item() == pytest.approx(4.0)
    # the padded layout of the same sequences, one per row, gives the same
    padded = torch.tensor([[4.0, 0, 0], [1.0, 2.0, 3.0], [6.0, 100.0, 0]])
    pmask = torch.tensor([[1.0, 0, 0], [1.0, 1.0, 1.0], [1.0, 0, 0]])
    assert aggregate(padded, pmask, "seq-mean-token-mean", 3.0).item() == pytest.approx(4.0)
    assert aggregate(loss, mask, "token-mean", 5.0, seq).item() == pytest.approx(16.0 / 5)  # seq_index not needed


def test_k3_is_bounded_at_extreme_gaps_and_unchanged_near_the_reference():
    # r = logp_ref - logp. Near 0 the clamps do nothing: r = 1 -> e - 1 - 1 = 0.718282; r = -3 -> e^-3 + 3 - 1
    # = 2.049787. Far away: r = 30 would be e^30 = 1.07e13 (and its gradient as large); r = 1000 overflows
    # to inf in float32. Both give the bound 10 and no gradient; r = -30 (the policy far MORE likely than
    # the reference) is linear, -r - 1 = 29, also bounded to 10.
    logp_ref = torch.zeros(1, 6)
    logp = torch.tensor([[-1.0, 3.0, -30.0, -1000.0, 30.0, -2.0]], requires_grad=True)
    kl = kl_penalty(logp, logp_ref, "k3")
    expected = torch.tensor([[math.e - 2.0, math.exp(-3.0) + 2.0, 10.0, 10.0, 10.0, math.exp(2.0) - 3.0]])
    torch.testing.assert_close(kl.detach(), expected)
    kl.sum().backward()
    # d/dlogp (e^r - r - 1) = 1 - e^r where unclamped: 1 - e = -1.718282, 1 - e^-3 = 0.950213, 1 - e^2
    grad = logp.grad[0]
    torch.testing.assert_close(grad[[0, 1, 5]], torch.tensor([1 - math.e, 1 - math.exp(-3.0), 1 - math.exp(2.0)]))
    assert grad[2:5].tolist() == [0.0, 0.0, 0.0]
    # bf16 too: finite everywhere (e^20 fits bf16's range)
    assert torch.isfinite(kl_penalty(logp.detach().bfloat16(), logp_ref.bfloat16(), "k3")).all()
    # the largest gradient any token can get is where k3 reaches the bound: r = 2.6109, |1 - e^r| = 12.611
    r = torch.linspace(-40, 40, 8001, dtype=torch.float64)
    lp = (-r).requires_grad_(True)
    kl_penalty(lp, torch.zeros_like(lp), "k3").sum().backward()
    assert lp.grad.abs().max() <= 12.62


def test_token_logprobs_hand_values_and_temperature():
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0]]])  # (1, 1, 3): softmax = [0.25, 0.5, 0.25]
    target = torch.tensor([[1]])
    # ln 0.5 = -0.693147
    torch.testing.assert_close(token_logprobs(logits, target), torch.tensor([[math.log(0.5)]]))
    # temperature 2: logits / 2 = [0, ln2 / 2, 0], probs ~ [1, sqrt 2, 1]: p = 1.414214 / 3.414214 = 0.414214
    torch.testing.assert_close(token_logprobs(logits, target, temperature=2.0), torch.tensor([[math.log(0.414214)]]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, target, temperature=0.0)


def test_token_logprobs_and_entropy_match_reference_across_chunks(monkeypatch):
    monkeypatch.setattr(losses, "_CHUNK_ROWS", 4)  # 3 * 5 = 15 rows: chunks of 4, 4, 4, 3
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 9, generator=g, requires_grad=True)
    targets = torch.randint(0, 9, (3, 5), generator=g)
    ours = token_logprobs(logits, targets, temperature=0.7)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref)
    ent = entropy_from_logits(logits.detach())
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=logits.detach()).entropy())
    # bf16 logits come back as float32 log-probs; float64 is not downcast
    assert token_logprobs(logits.detach().bfloat16(), targets).dtype == torch.float32
    assert token_logprobs(logits.detach().double(), targets).dtype == torch.float64


def test_entropy_hand_values():
    logits = torch.tensor([[
        [0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4 = 1.386294
        [math.log(2.0), 0.0, 0.0, -INF],  # [0.5, 0.25, 0.25, 0]: 0.5 ln 2 + 0.5 ln 4 = 1.039721
        [0.0, -INF, -INF, -INF],  # one-hot: 0, not nan from 0 * -inf
    ]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[1.386294, 1.039721, 0.0]]))


def test_mask_mode_token_over_the_cap_adds_exactly_zero_even_when_u_overflows():
    # token 0: w = exp(prox - behav) = e^10 > cap 5 -> masked; its u = exp(200) overflows to inf in float32.
    # Before the fix: w * max(-A u, -A clip(u)) = 0 * inf = nan, and the whole step was skipped.
    logp = torch.tensor([[100.0, -1.0]], requires_grad=True)  # (1, 2)
    prox = torch.tensor([[-100.0, -1.0]])
    behav = torch.tensor([[-110.0, -1.0]])
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, sums = _call(logp, prox, behav, adv, mask, behav_weight_cap=5.0, cap_mode="mask", loss_denominator=2.0)
    # token 1: w = 1, u = 1, L = -1 * 1 = -1; token 0 adds 0 -> -1 / 2
    assert loss.item() == -0.5
    loss.backward()
    assert torch.equal(logp.grad, torch.tensor([[0.0, -0.5]]))  # nothing flows into the masked token
    assert sums["capped"].item() == 1 and sums["clipped"].item() == 0 and math.isfinite(sums["approx_kl"].item())
