"""Generalised advantage estimation over a response's tokens (Schulman et al. arXiv 1506.02438;
docs/design.md section 3b).

    advantages, returns = gae(values, mask, reward, gamma, lam)      # one trajectory, per token

With V[t] the critic's value at response token t (the state before the model wrote it) and the
outcome reward r given at the last model-written token:

    delta[t] = r[t] + gamma * V[t+1] - V[t]          V after the last model token = 0
    A[t]     = delta[t] + gamma * lam * A[t+1]
    R[t]     = A[t] + V[t]                            the critic's regression target

In an episode only model-written tokens (loss mask 1) are time steps: environment tokens between
two model turns are part of the transition, carry no value and get advantage 0, and the next model
token's value is the bootstrap of the last one before them. Computed in float64.
"""

from __future__ import annotations


def gae(values: list[float], mask: list[float], reward: float, gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """(advantages, returns) of one trajectory, a value per response token (0 where mask is 0)."""
    if len(values) != len(mask):
        raise ValueError(f"gae: {len(values)} values for {len(mask)} response tokens")
    steps = [t for t, m in enumerate(mask) if m > 0]  # the model's tokens: the time steps
    advantages = [0.0] * len(values)
    returns = [0.0] * len(values)
    next_value, next_adv = 0.0, 0.0
    for j in range(len(steps) - 1, -1, -1):
        t = steps[j]
        r = reward if j == len(steps) - 1 else 0.0  # the outcome reward at the last model token
        delta = r + gamma * next_value - values[t]
        next_adv = delta + gamma * lam * next_adv
        advantages[t] = next_adv
        returns[t] = next_adv + values[t]
        next_value = values[t]
    return advantages, returns
