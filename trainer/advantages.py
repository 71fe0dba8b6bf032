"""Critic-free advantages from G sampled responses per prompt (docs/design.md section 3), and the
EWMA normaliser of the batch-size-invariant setting (section 4).

    group_advantages(rewards, group_index, method, baseline=None) -> (N,)
    EWMANormalizer(span): update(x), normalize(x), state_dict(), load_state_dict()
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor

from trainer.invariance import ewma_beta_from_span

ADVANTAGE_METHODS = ("grpo", "dr_grpo", "rloo", "remax")
GRPO_EPS = 1e-6


def group_advantages(
    rewards: Tensor, group_index: Tensor, method: str, baseline: Optional[Tensor] = None
) -> Tensor:
    """Sequence-level advantage of each of N responses; responses with equal `group_index`
    answer the same prompt (any integer ids, not necessarily contiguous).

    - "grpo" (Shao et al. arXiv 2402.03300, section 4.1.2, outcome supervision):
      (r_i - mean_g) / (std_g + 1e-6), std_g the unbiased sample std (n - 1), as
      torch.std in TRL and verl; a group of 1 has std 0 and advantage 0.
    - "dr_grpo" (Liu et al. arXiv 2503.20783): r_i - mean_g.
    - "rloo" (Ahmadian et al. arXiv 2402.14740): r_i - mean_{j != i} r_j
      = n / (n - 1) * (r_i - mean_g); a group of 1 gets 0.
    - "remax" (Li et al. arXiv 2310.10505): r_i - baseline_g, baseline_g the reward
      of the greedy response to the group's prompt. `baseline` is (G,), one entry per
      distinct group id in ascending id order (so baseline[g] for ids 0..G-1).

    Computed in float64 and returned as float32. A group whose rewards are all equal gets
    exactly 0 for grpo, dr_grpo and rloo (docs/design.md section 3).
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} must both be (N,)"
        )
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"algorithm.advantage={method!r} is not one of {ADVANTAGE_METHODS}")
    # float64: a float32 group mean of equal rewards is not exactly that reward (0.7 * 16 / 16 != 0.7),
    # and dividing its rounding error by (std + 1e-6) would give every member a sizeable advantage
    r = rewards.double()  # (N,)
    ids, inv = torch.unique(group_index, sorted=True, return_inverse=True)  # (G,), (N,) in 0..G-1
    num_groups = ids.numel()

    if method == "remax":
        if baseline is None or baseline.shape != (num_groups,):
            got = None if baseline is None else tuple(baseline.shape)
            raise ValueError(
                f"remax needs baseline of shape ({num_groups},): the greedy reward of each group in "
                f"ascending group id order; got {got}"
            )
        return (r - baseline.to(r)[inv]).float()

    count = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))  # (G,)
    total = torch.zeros_like(count).index_add_(0, inv, r)  # (G,)
    high = torch.full_like(count, -torch.inf).scatter_reduce_(0, inv, r, "amax")  # (G,)
    low = torch.full_like(count, torch.inf).scatter_reduce_(0, inv, r, "amin")  # (G,)
    n = count[inv]  # (N,) size of each response's group
    mean = (total / count)[inv]  # (N,)
    # a group whose rewards are all equal carries no signal: exactly 0, whatever the rounding of its mean
    centered = torch.where((high == low)[inv], torch.zeros_like(r), r - mean)  # (N,)

    if method == "dr_grpo":
        return centered.float()
    if method == "rloo":
        # r_i - (n * mean - r_i) / (n - 1) = n / (n - 1) * (r_i - mean); 0 for n = 1
        return torch.where(n > 1, centered * n / (n - 1).clamp(min=1), torch.zeros_like(r)).float()
    # grpo
    sq = torch.zeros_like(count).index_add_(0, inv, centered.square())  # (G,)
    var = sq / (count - 1).clamp(min=1)  # (G,) unbiased; 0 for a group of 1
    std = var.sqrt()[inv]  # (N,)
    return (centered / (std + GRPO_EPS)).float()


class EWMANormalizer:
    """Normalise advantages (or rewards) by EWMA statistics instead of per-batch ones
    (Hilton et al. arXiv 2110.00641: EWMA statistics of mean and variance, their span
    multiplied by c when the batch shrinks by c).

    Per update, with m1 = mean(x) and m2 = mean(x^2) over the batch:
        mu_n = beta * mu_{n-1} + (1 - beta) * m1,  s_n = beta * s_{n-1} + (1 - beta) * m2,  mu_0 = s_0 = 0
        mean = mu_n / (1 - beta^n),  var = s_n / (1 - beta^n) - mean^2  (clamped at 0)
        normalize(x) = (x - mean) / (sqrt(var) + eps)
    beta = 1 - 2 / (span + 1): span is in updates (training steps), not samples. Typical use:
    update(adv) then normalize(adv), so the current batch is in the statistics. A trainer whose
    step may still be skipped (non-finite loss) takes `updated(adv)`, a copy with the batch in
    its statistics, and keeps it only if the step was taken.
    """

    def __init__(self, span: float, eps: float = GRPO_EPS) -> None:
        self.span = float(span)
        self.beta = ewma_beta_from_span(span)
        self.eps = eps
        self.num_updates = 0
        self._mean_raw = 0.0
        self._sq_raw = 0.0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        if x.numel() == 0:
            raise ValueError("EWMANormalizer.update got an empty tensor; skip the update instead")
        x = x.double()  # .item() below is a device sync point, once per training step
        self._mean_raw = self.beta * self._mean_raw + (1.0 - self.beta) * x.mean().item()
        self._sq_raw = self.beta * self._sq_raw + (1.0 - self.beta) * x.square().mean().item()
        self.num_updates += 1

    def updated(self, x: Tensor) -> "EWMANormalizer":
        """A copy of this normaliser after `update(x)`; this one is left as it was."""
        new = copy.copy(self)
        new.update(x)
        return new

    @property
    def mean(self) -> float:
        return self._mean_raw / self._correction()

    @property
    def var(self) -> float:
        return max(self._sq_raw / self._correction() - self.mean**2, 0.0)

    def _correction(self) -> float:
        if self.num_updates == 0:
            raise RuntimeError("EWMANormalizer has no statistics yet; call update(x) before normalize(x)")
        return 1.0 - self.beta**self.num_updates

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / (self.var**0.5 + self.eps)

    def state_dict(self) -> dict:
        return {"span": self.span, "eps": self.eps, "num_updates": self.num_updates,
                "mean_raw": self._mean_raw, "sq_raw": self._sq_raw}

    def load_state_dict(self, state: dict) -> None:
        self.span = float(state["span"])
        self.beta = ewma_beta_from_span(self.span)
        self.eps = float(state["eps"])
        self.num_updates = int(state["num_updates"])
        self._mean_raw = float(state["mean_raw"])
        self._sq_raw = float(state["sq_raw"])
