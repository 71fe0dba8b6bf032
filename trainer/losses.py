"""Policy losses and the per-token quantities they are built from (docs/design.md section 3).

    policy_loss(logp, logp_prox, logp_behav, advantages, mask, *, ...) -> (loss, sums)
    aggregate(per_token_loss, mask, mode, denominator, seq_index=None) -> scalar
    kl_penalty(logp, logp_ref, estimator) -> (B, T)
    token_logprobs(logits, targets, temperature=1.0) -> (B, T)
    bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef=0.0) -> (loss, sums)   # reward models
    entropy_from_logits(logits) -> (B, T)

Every per-token tensor is (B, T): B sequences of the micro-batch, T response positions,
with `mask` (float 0/1) marking valid response tokens. Normalisation is by a denominator
the caller computes over the *global* batch (every micro-batch on every data-parallel
rank), so micro-batch size, gradient accumulation and the number of trainer workers do
not change the gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean")
CAP_MODES = ("clamp", "mask")
KL_ESTIMATORS = ("k1", "k3")
K3_LOG_RATIO_BOUND = 20.0  # |logp_ref - logp| beyond this is clamped before exp (kl_penalty)
K3_MAX = 10.0  # the k3 penalty of one token is at most this (kl_penalty)

# rows of (B*T, V) logits processed at once by token_logprobs / entropy_from_logits:
# bounds the float32 temporaries to _CHUNK_ROWS * V elements instead of B * T * V
_CHUNK_ROWS = 1024


def aggregate(per_token_loss: Tensor, mask: Tensor, mode: str, denominator: float,
              seq_index: Optional[Tensor] = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar that sums correctly across micro-batches.

    - "token-mean": sum_{b,t} L[b,t] * mask[b,t] / denominator, where denominator is the
      number of valid tokens in the global batch.
    - "seq-mean-token-mean": sum_s (sum_{t in s} L[t] * mask[t] / sum_{t in s} mask[t]) / denominator,
      where denominator is the number of sequences in the global batch. A sequence with no
      valid token contributes 0.

    Sequences are the rows of the (B, T) tensors, or, when `seq_index` (same shape, int64) is given,
    the groups of positions sharing an index: a packed micro-batch holds several sequences in one row,
    and taking the row for one sequence would average over all of them at once.

    Summing the result over every micro-batch (and data-parallel rank) gives the global mean.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"agg_mode={mode!r} is not one of {AGG_MODES}")
    if not denominator > 0:
        raise ValueError(f"loss_denominator={denominator!r} must be > 0 (the global count of valid tokens or sequences)")
    valid = mask > 0  # (B, T)
    # where, not a product: padded positions may hold inf/nan (e.g. log-probs of pad tokens)
    masked = torch.where(valid, per_token_loss, torch.zeros_like(per_token_loss))  # (B, T)
    if mode == "token-mean":
        return masked.sum() / denominator
    if seq_index is None:
        seq_len = valid.sum(dim=-1).clamp(min=1)  # (B,)
        seq_sum = masked.sum(dim=-1)  # (B,)
    else:
        index = seq_index.reshape(-1)  # (B*T,) values < B*T: as many slots as positions, unused ones stay 0/1 = 0
        n = index.numel()  # no host sync for the count of sequences
        seq_len = torch.zeros(n, dtype=masked.dtype, device=masked.device).index_add_(
            0, index, valid.reshape(-1).to(masked.dtype)).clamp(min=1)  # (S,)
        seq_sum = torch.zeros(n, dtype=masked.dtype, device=masked.device).index_add_(0, index, masked.reshape(-1))  # (S,)
    return (seq_sum / seq_len).sum() / denominator


def policy_loss(
    logp: Tensor,
    logp_prox: Tensor,
    logp_behav: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    behav_weight_cap: Optional[float],
    cap_mode: str,
    loss_denominator: float,
    agg_mode: str = "token-mean",
    seq_index: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled PPO clipped objective, AReaL (arXiv 2505.24298) eq. 5 = Hilton et al.
    (arXiv 2110.00641) L^CLIP_dec:

        w[t] = exp(logp_prox[t] - logp_behav[t])                      (no grad, capped)
        u[t] = exp(logp[t] - logp_prox[t])
        L[t] = -w[t] * min(u[t] * A[t], clip(u[t], 1 - eps_low, 1 + eps_high) * A[t])

    Coupled PPO (Schulman et al. arXiv 1707.06347 eq. 7) is the same call with
    logp_prox = logp_behav, so w = 1.

    behav_weight_cap: None = no cap. cap_mode "clamp": w = min(w, cap) (Hilton's cap of 100);
    "mask": tokens with w > cap get weight 0 (AReaL masks w > 5).

    Returns the loss aggregated with `aggregate(L, mask, agg_mode, loss_denominator, seq_index)` and
    detached sums over the valid tokens of this micro-batch, to be added up over the step:
      clipped:   tokens where the clipped term is selected and differs from the unclipped one
      approx_kl: k3 estimate of KL(pi_prox || pi_theta), (u - 1) - log u per token
                 (Schulman, "Approximating KL divergence", 2020); unweighted by w, so with
                 pi_behav != pi_prox it is the estimate under the behaviour samples
      capped:    tokens whose w exceeded the cap (0 when there is no cap)
      tokens:    valid tokens
    """
    if cap_mode not in CAP_MODES:
        raise ValueError(f"cap_mode={cap_mode!r} is not one of {CAP_MODES}")
    valid = mask > 0  # (B, T)
    logp_prox = logp_prox.detach()

    with torch.no_grad():
        # padded positions may hold any value (-inf behaviour log-probs): w = 0 there, never inf
        log_w = torch.where(valid, logp_prox - logp_behav, torch.full_like(logp_prox, -torch.inf))  # (B, T)
        w = torch.exp(log_w)  # (B, T) behaviour importance weight
        if behav_weight_cap is None:
            over_cap = torch.zeros_like(valid)
        else:
            over_cap = w > behav_weight_cap  # (B, T)
            if cap_mode == "clamp":
                w = w.clamp(max=behav_weight_cap)
            else:
                w = torch.where(over_cap, torch.zeros_like(w), w)

    # where, not a product: keeps inf/nan at padded positions out of the backward pass too. A token
    # masked by the cap adds exactly 0 whatever u is: its u is taken as 1 (an overflowing u would make
    # 0 * inf = nan in the forward pass and 0 * inf in the backward pass)
    live = valid & ~over_cap if cap_mode == "mask" else valid  # (B, T)
    log_u = torch.where(live, logp - logp_prox, torch.zeros_like(logp))  # (B, T)
    u = torch.exp(log_u)  # (B, T) trust-region ratio
    pg_loss1 = -advantages * u  # (B, T)
    pg_loss2 = -advantages * torch.clamp(u, 1.0 - eps_low, 1.0 + eps_high)  # (B, T)
    pg_loss = w * torch.maximum(pg_loss1, pg_loss2)  # (B, T) = -w * min(u A, clip(u) A)

    loss = aggregate(pg_loss, mask, agg_mode, loss_denominator, seq_index)

    with torch.no_grad():
        # float32 sums: bf16 cannot count past 256 exactly
        log_u = log_u.detach().float()
        k3 = torch.expm1(log_u) - log_u  # (B, T) (u - 1) - log u >= 0
        sums = {
            "clipped": ((pg_loss2 > pg_loss1) & valid).sum().float(),
            "approx_kl": torch.where(valid, k3, torch.zeros_like(k3)).sum(),
            "capped": (over_cap & valid).sum().float(),
            "tokens": valid.sum().float(),
        }
    return loss, sums


def kl_penalty(logp: Tensor, logp_ref: Tensor, estimator: str) -> Tensor:
    """Per-token (B, T) estimate of KL(pi_theta || pi_ref) from tokens sampled by pi_theta
    (Schulman, "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html):

        k1 = logp - logp_ref                                  unbiased, high variance, can be < 0
        k3 = exp(r) - r - 1,  r = logp_ref - logp             unbiased, low variance, >= 0

    k3 grows like exp(r): a token the policy made far less likely than the reference would give a
    penalty and a gradient of e^r (e^30 = 1e13 at r = 30) and take over the update. So r is clamped to
    [-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND] (exp stays finite in bf16 and float32) and the penalty to
    at most K3_MAX (verl's bounds, 20 and 10): a token past the bound contributes K3_MAX and no gradient,
    and the gradient of any token is at most e^r - 1 = 12.61 in size (k3 reaches 10 at r = 2.611).
    """
    if estimator == "k1":
        return logp - logp_ref
    if estimator == "k3":
        log_ratio = (logp_ref - logp).clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)  # (B, T) log(pi_ref / pi_theta)
        return (torch.expm1(log_ratio) - log_ratio).clamp(max=K3_MAX)
    raise ValueError(f"kl_estimator={estimator!r} is not one of {KL_ESTIMATORS}")


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _row_chunks(x: Tensor) -> tuple[Tensor, ...]:
    return x.reshape(-1, x.shape[-1]).split(_CHUNK_ROWS, dim=0)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[targets], (B, T) in float32 (float64 stays float64).

    The rollout engine records log-probs of the tempered distribution it samples from, so
    the trainer must use the same temperature. Computed as z[target] - logsumexp(z) over row
    chunks, never materialising a full (B, T, V) log_softmax; bf16 logits are upcast one
    chunk at a time (with grad enabled, autograd keeps those float32 chunks for backward).
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (rollout.temperature)")
    out = []
    for z, tgt in zip(_row_chunks(logits), targets.reshape(-1).split(_CHUNK_ROWS)):
        z = _at_least_float32(z)  # (n, V)
        if temperature != 1.0:
            z = z / temperature
        picked = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (n,)
        out.append(picked - torch.logsumexp(z, dim=-1))  # (n,)
    return torch.cat(out).reshape(targets.shape)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position, (B, T) in float32 (float64 stays float64):

        H = logsumexp(z) - sum_v softmax(z)_v * z_v

    over row chunks, so the softmax temporary is (chunk, V), not (B, T, V). Divide the logits
    by the sampling temperature first to get the entropy of the sampling distribution.
    """
    out = []
    for z in _row_chunks(logits):
        z = _at_least_float32(z)  # (n, V)
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        p = torch.softmax(z, dim=-1)  # (n, V)
        pz = torch.where(p > 0, p * z, torch.zeros_like(z))  # (n, V) 0 * -inf (banned token) counts as 0
        out.append(lse - pz.sum(dim=-1))  # (n,)
    return torch.cat(out).reshape(logits.shape[:-1])


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Optional[Tensor] = None,
                       center_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model loss over preference pairs (Bradley-Terry; Ouyang et al. arXiv 2203.02155 eq. 1):

        L = mean_i -log sigmoid(r_c[i] - r_r[i] - margin[i])  +  center_coef * mean_i (r_c[i] + r_r[i])^2

    r_chosen, r_rejected: (N,) scalar rewards of each pair's chosen and rejected response; margin: (N,)
    or None (Llama 2's margin term). The second term (reward centering, TRL's center_rewards_coefficient)
    keeps the rewards near 0 without changing which response wins. -log sigmoid(x) is computed as
    softplus(-x): finite for any x. Returns the loss and detached sums over the N pairs: `correct`
    (r_c > r_r: pair accuracy), `margin` (r_c - r_r) and `pairs`.
    """
    diff = r_chosen - r_rejected  # (N,)
    logits = diff - margin if margin is not None else diff
    loss = torch.nn.functional.softplus(-logits).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with torch.no_grad():
        sums = {"correct": (diff > 0).sum().float(), "margin": diff.detach().float().sum(),
                "pairs": torch.tensor(float(diff.numel()), device=diff.device)}
    return loss, sums
