"""PPO updates per batch: how a batch splits into minibatches, and the step's diagnostics over them.

    split_minibatches(n, k) -> [[0..], [..], ...]     # k contiguous parts of n trajectories
    UpdateStats: add(sums, grad_norm, applied) per optimizer update, then metrics()

One training step makes K = trainer.num_minibatches x trainer.ppo_epochs optimizer updates on its
batch (AReaL `ppo_n_minibatches`, verl `ppo_mini_batch_size` / `ppo_epochs`, TRL
`num_iterations`). Each update's loss is the token mean over its own minibatch, so the
micro-batch split inside a minibatch never changes the gradient. The step's diagnostics are
aggregated over every update, never taken from the last one (docs/design.md section 7).
"""

from __future__ import annotations

import math


def split_minibatches(n: int, k: int) -> list[list[int]]:
    """Trajectory indices 0..n-1 in k contiguous minibatches whose sizes differ by at most one.

    Contiguous keeps a group's samples together where the sizes allow; the advantages are
    computed over the whole batch before any split, so a group cut in two changes nothing."""
    if k < 1:
        raise ValueError(f"trainer.num_minibatches={k} must be >= 1")
    if n < k:
        raise ValueError(f"a batch of {n} trajectories cannot be split into trainer.num_minibatches={k} minibatches")
    size, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        out.append(list(range(start, end)))
        start = end
    return out


class UpdateStats:
    """Sums of one step's updates: token-weighted means over every update, and the max over updates
    of the per-update ratios (clipfrac, approx_kl) and of the gradient norm."""

    KEYS = ("loss", "kl", "entropy", "prox_behav_diff", "tokens", "clipped", "approx_kl", "capped",
            "behav_kl", "behav_w", "behav_w2")

    def __init__(self) -> None:
        self.total = dict.fromkeys(self.KEYS, 0.0)
        self.updates = 0
        self.applied = 0
        self.losses: list[float] = []
        self.kls: list[float] = []
        self.grad_norms: list[float] = []
        self.clipfracs: list[float] = []
        self.approx_kls: list[float] = []

    def add(self, sums: dict[str, float], grad_norm: float, applied: bool) -> None:
        """One update's sums over its valid tokens (every rank's, already reduced)."""
        for k in self.KEYS:
            self.total[k] += sums[k]
        self.updates += 1
        self.applied += int(applied)
        tokens = max(sums["tokens"], 1.0)
        self.losses.append(sums["loss"])
        self.kls.append(sums["kl"])
        self.grad_norms.append(grad_norm)
        self.clipfracs.append(sums["clipped"] / tokens)
        self.approx_kls.append(sums["approx_kl"] / tokens)

    @property
    def skipped(self) -> int:
        return self.updates - self.applied

    def _ess(self) -> float:
        w, w2, n = self.total["behav_w"], self.total["behav_w2"], self.total["tokens"]
        if not w2 > 0:
            return 1.0  # nothing trained on: no weights to be uneven
        if not math.isfinite(w2):
            return 0.0  # a weight beyond float64's range: one token outweighs the rest entirely
        return w * w / (n * w2)

    def metrics(self, kl_coef: float) -> dict[str, float]:
        tokens = max(self.total["tokens"], 1.0)  # diagnostics are over the tokens that were trained on
        n = max(self.updates, 1)
        finite_norms = [g for g in self.grad_norms if math.isfinite(g)]
        return {
            # each update's loss is its minibatch's token mean: their mean over the step
            "loss/policy": (sum(self.losses) - kl_coef * sum(self.kls)) / n,
            "loss/kl": sum(self.kls) / n,
            "policy/clipfrac": self.total["clipped"] / tokens,
            "policy/clipfrac_max": max(self.clipfracs, default=0.0),
            "policy/approx_kl": self.total["approx_kl"] / tokens,
            "policy/approx_kl_max": max(self.approx_kls, default=0.0),
            "policy/entropy": self.total["entropy"] / tokens,
            "policy/behav_weight_capped_frac": self.total["capped"] / tokens,
            "policy/logp_prox_minus_behav": self.total["prox_behav_diff"] / tokens,
            # how far the engine's policy is from pi_prox (docs/design.md section 3b): k3 KL(pi_behav || pi_prox)
            # on the sampled tokens, and the effective sample size of the behaviour weights w = pi_prox / pi_behav,
            # (sum w)^2 / (N sum w^2): 1 on-policy, -> 1/N as one token's weight dominates
            "policy/behav_kl": self.total["behav_kl"] / tokens,
            "policy/behav_ess": self._ess(),
            "policy/grad_norm": sum(self.grad_norms) / n if self.grad_norms else 0.0,
            # the largest finite norm (a non-finite one skipped its update and shows in the mean)
            "policy/grad_norm_max": max(finite_norms, default=float("nan") if self.grad_norms else 0.0),
            "train/updates": self.updates,
            "train/skipped_updates": self.skipped,
        }
