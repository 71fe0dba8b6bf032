"""Batch-size invariance (Hilton, Cobbe, Schulman 2021, arXiv 2110.00641; docs/design.md section 4).

    derive_invariant_hparams(reference_batch_size, batch_size, ...) -> InvariantHparams
    ewma_center_of_mass(beta) -> steps;  ewma_span(beta) -> steps;  ewma_beta_from_span(span) -> beta
    EWMAParams(params, beta): theta_ewma <- beta * theta_ewma + (1 - beta) * theta, bias-corrected

With B = B_ref / c, the paper's rules are:
    Adam lr             lr_ref / sqrt(c)
    PPO-EWMA beta       centre of mass x c:  beta = 1 - 1 / (c * (1 / (1 - beta_ref) - 1) + 1)
    adv-norm EWMA       span x c, span = 2 / (1 - beta) - 1 steps
    Adam betas          beta ** (1 / c)     (optional; Adam eps is ignored)

With several optimizer updates per batch (trainer.num_minibatches = K), the paper's batch size is
the one an optimizer update sees, the minibatch of B / K trajectories, so two ratios appear:
    c_update = (B_ref / K_ref) / (B / K)   Adam lr, Adam betas, PPO-EWMA centre of mass: each is
                                           per optimizer update (the EWMA of the weights is updated
                                           after every optimizer update, so c_update x the updates
                                           cover the same trajectories)
    c_batch  = B_ref / B                   the advantage-norm EWMA span: it is updated once per
                                           training step, on the whole batch
With K_ref = K (the default) both are c = B_ref / B. ppo_epochs is taken as the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor


def ewma_center_of_mass(beta: float) -> float:
    """Centre of mass of an EWMA with decay beta, in steps: 1 / (1 - beta) - 1 = beta / (1 - beta).
    Hilton's default beta = 0.889 gives ~8 steps."""
    _check_beta(beta, "beta")
    return 1.0 / (1.0 - beta) - 1.0


def ewma_span(beta: float) -> float:
    """Span of an EWMA with decay beta, in steps: 2 / (1 - beta) - 1 (the pandas convention)."""
    _check_beta(beta, "beta")
    return 2.0 / (1.0 - beta) - 1.0


def ewma_beta_from_span(span: float) -> float:
    """Inverse of `ewma_span`: beta = 1 - 2 / (span + 1). span = 1 gives beta = 0 (no memory)."""
    if not span >= 1:
        raise ValueError(f"EWMA span={span!r} must be >= 1 step (span 1 = this step's statistics only)")
    return 1.0 - 2.0 / (span + 1.0)


def _check_beta(beta: float, name: str) -> None:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name}={beta!r} must be in [0, 1)")


@dataclass(frozen=True)
class InvariantHparams:
    """Hyper-parameters for batch size B derived from a reference configuration at B_ref."""

    c: float  # (B_ref / K_ref) / (B / K): the ratio of trajectories per optimizer update
    c_batch: float  # B_ref / B: the ratio of trajectories per training step
    lr: float  # lr_ref / sqrt(c)
    ewma_beta: float  # PPO-EWMA decay with c x the reference centre of mass
    ewma_center_of_mass: float  # 1 / (1 - ewma_beta) - 1, optimizer steps
    adv_norm_span: Optional[float]  # reference span x c, steps; None = off
    adv_norm_beta: Optional[float]  # 1 - 2 / (adv_norm_span + 1)
    adam_betas: tuple[float, float]  # reference betas ** (1 / c) if adapted, else unchanged


def derive_invariant_hparams(
    reference_batch_size: int,
    batch_size: int,
    *,
    lr_ref: float,
    ewma_beta_ref: float,
    adv_norm_span_ref: Optional[float],
    adam_betas_ref: tuple[float, float] = (0.9, 0.999),
    adapt_adam_betas: bool = False,
    num_minibatches: int = 1,
    reference_num_minibatches: Optional[int] = None,
) -> InvariantHparams:
    """Apply Hilton et al.'s scaling rules (arXiv 2110.00641) for B = B_ref / c (see the module
    docstring for K = num_minibatches > 1; reference_num_minibatches unset = num_minibatches)."""
    if reference_batch_size < 1 or batch_size < 1:
        raise ValueError(
            f"batch_invariance.reference_batch_size={reference_batch_size!r} and batch size={batch_size!r} "
            "must both be >= 1"
        )
    _check_beta(ewma_beta_ref, "ewma_beta_ref")
    k_ref = num_minibatches if reference_num_minibatches is None else reference_num_minibatches
    c_batch = reference_batch_size / batch_size
    c = (reference_batch_size / k_ref) / (batch_size / num_minibatches)
    ewma_beta = 1.0 - 1.0 / (c * ewma_center_of_mass(ewma_beta_ref) + 1.0)
    adv_norm_span = None if adv_norm_span_ref is None else adv_norm_span_ref * c_batch  # None: normalisation off
    if adv_norm_span is not None and adv_norm_span < 1:
        raise ValueError(
            f"advantage-norm span {adv_norm_span_ref!r} x c={c_batch:g} = {adv_norm_span:g} steps is < 1: the batch size "
            f"{batch_size} is too large for this reference; raise the reference span or "
            "batch_invariance.reference_batch_size"
        )
    b1, b2 = adam_betas_ref
    adam_betas = (b1 ** (1.0 / c), b2 ** (1.0 / c)) if adapt_adam_betas else (b1, b2)
    return InvariantHparams(
        c=c,
        c_batch=c_batch,
        lr=lr_ref / math.sqrt(c),
        ewma_beta=ewma_beta,
        ewma_center_of_mass=ewma_center_of_mass(ewma_beta),
        adv_norm_span=adv_norm_span,
        adv_norm_beta=None if adv_norm_span is None else ewma_beta_from_span(adv_norm_span),
        adam_betas=adam_betas,
    )


class EWMAParams:
    """Exponential moving average of parameters for the PPO-EWMA proximal policy
    (Hilton et al. arXiv 2110.00641, PPO-EWMA):

        raw_n = beta * raw_{n-1} + (1 - beta) * theta_n,   raw_0 = 0
        theta_ewma = raw_n / (1 - beta^n)                  (bias correction)

    Stored directly as the bias-corrected average, through the equivalent recursion
        a_n = (1 - beta) / (1 - beta^n)
        avg_n = (1 - a_n) * avg_{n-1} + a_n * theta_n      (a_1 = 1: avg_1 = theta_1)
    so `averaged()` returns the stored tensors without a copy and the memory cost is exactly
    one extra copy of the tracked parameters (float32 by `dtype` keeps small increments on
    bf16 weights). Call `update` after every optimizer step (and once on the initial weights).
    """

    def __init__(self, params: Iterable[Tensor], beta: float, dtype: Optional[torch.dtype] = None) -> None:
        _check_beta(beta, "ewma beta")
        self.beta = beta
        self.num_updates = 0
        self._avg = [torch.zeros_like(p, dtype=dtype or p.dtype) for p in params]

    @torch.no_grad()
    def update(self, params: Iterable[Tensor]) -> None:
        params = [p.detach() for p in params]
        if len(params) != len(self._avg):
            raise ValueError(f"EWMAParams tracks {len(self._avg)} tensors but update got {len(params)}")
        self.num_updates += 1
        a = (1.0 - self.beta) / (1.0 - self.beta**self.num_updates)
        for avg, p in zip(self._avg, params):
            avg.mul_(1.0 - a).add_(p.to(avg.dtype), alpha=a)

    def _require_update(self) -> None:
        if self.num_updates == 0:
            raise RuntimeError("EWMAParams has no update yet; call update(params) before reading the average")

    @torch.no_grad()
    def averaged(self) -> list[Tensor]:
        """The bias-corrected averages (the stored tensors themselves: do not modify them)."""
        self._require_update()
        return self._avg

    @torch.no_grad()
    def copy_to(self, targets: Iterable[Tensor]) -> None:
        """Write the bias-corrected averages into `targets` (e.g. a proximal model's parameters)."""
        self._require_update()
        targets = list(targets)
        if len(targets) != len(self._avg):
            raise ValueError(f"EWMAParams tracks {len(self._avg)} tensors but copy_to got {len(targets)}")
        for t, avg in zip(targets, self._avg):
            t.copy_(avg)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "num_updates": self.num_updates, "avg": [a.clone() for a in self._avg]}

    def load_state_dict(self, state: dict) -> None:
        avg = state["avg"]
        if len(avg) != len(self._avg) or any(a.shape != b.shape for a, b in zip(avg, self._avg)):
            raise ValueError("EWMAParams state_dict does not match the tracked parameters (count or shapes differ)")
        _check_beta(state["beta"], "ewma beta")
        self.beta = float(state["beta"])
        self.num_updates = int(state["num_updates"])
        with torch.no_grad():
            for dst, src in zip(self._avg, avg):
                dst.copy_(src)


def effective_hparams(cfg) -> dict:
    """The learning rate, Adam betas, EWMA decay and advantage-norm span the trainer uses:
    the configured ones, or — with `batch_invariance.reference_batch_size` set — the values
    derived for trainer.batch_size by the rules above (the configured ones are the reference's)."""
    alg, t = cfg.algorithm, cfg.trainer
    out = {"c": 1.0, "c_batch": 1.0, "lr": t.lr, "adam_betas": (t.adam_beta1, t.adam_beta2), "ewma_decay": alg.ewma_decay,
           "ewma_center_of_mass_steps": ewma_center_of_mass(alg.ewma_decay), "adv_norm_span": alg.adv_norm_span}
    ref = cfg.batch_invariance.reference_batch_size
    if ref is None:
        return out
    h = derive_invariant_hparams(
        ref, t.batch_size, lr_ref=t.lr, ewma_beta_ref=alg.ewma_decay,
        adv_norm_span_ref=alg.adv_norm_span,
        adam_betas_ref=(t.adam_beta1, t.adam_beta2), adapt_adam_betas=cfg.batch_invariance.adapt_adam_betas,
        num_minibatches=t.num_minibatches, reference_num_minibatches=cfg.batch_invariance.reference_num_minibatches,
    )
    return {"c": h.c, "c_batch": h.c_batch, "lr": h.lr, "adam_betas": h.adam_betas, "ewma_decay": h.ewma_beta,
            "ewma_center_of_mass_steps": h.ewma_center_of_mass,
            "adv_norm_span": h.adv_norm_span}
