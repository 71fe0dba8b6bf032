"""The admission rule and the trajectory accounting of docs/design.md section 5 (AReaL).

Pure bookkeeping with no Ray in it, so the rule is unit-tested directly; the Ray actor
in `staleness.service` wraps one instance.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StalenessController:
    """Bounds how old training data may be.

    With policy version i (weight versions published so far), batch size B
    (trajectories per step) and bound eta, a rollout may start only while
        accepted + running < (i + eta + 1) * B    (and running < max_running).
    Admitting a group of n rollouts at once is the same rule for its last member:
        accepted + running + n <= (i + eta + 1) * B.
    eta = 0 is synchronous training: no rollout for batch k+1 starts before version
    k+1 is published.

    Every admitted rollout ends as consumed, dropped (with a reason) or in flight:
        admitted = consumed + dropped + running + buffered.

    A dropped rollout, whatever the reason (stale, error, zero-variance group, lost worker),
    leaves `running` or `accepted`: only rollouts that can still be trained on hold admission
    capacity. Otherwise every drop would shrink the pipeline for good: after D drops it would
    hold (eta + 1) * B - D rollouts, and once D reached eta * B the run would be synchronous.
    Since accepted counts consumed rollouts too (i * B after i steps), the pipeline holds
    (eta + 1) * B rollouts not yet trained on at most.
    """

    batch_size: int
    max_staleness: int
    max_running: int | None = None
    version: int = 0
    admitted: int = 0
    running: int = 0
    accepted: int = 0  # finished into the buffer and not dropped since (consumed ones included)
    consumed: int = 0
    buffered: int = 0
    dropped: Counter = field(default_factory=Counter)
    paused: bool = False
    lag_seen_max: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"trainer.batch_size={self.batch_size} must be >= 1")
        if self.max_staleness < 0:
            raise ValueError(f"staleness.max_staleness={self.max_staleness} must be >= 0; use 0 for synchronous training")

    def capacity(self) -> int:
        return (self.version + self.max_staleness + 1) * self.batch_size

    def can_admit(self, n: int) -> bool:
        if self.paused:
            return False
        if self.max_running is not None and self.running + n > self.max_running:
            return False
        return self.accepted + self.running + n <= self.capacity()

    def admit(self, n: int) -> None:
        if not self.can_admit(n):
            raise RuntimeError(f"admit({n}) refused: accepted={self.accepted} running={self.running} capacity={self.capacity()}")
        self.admitted += n
        self.running += n

    def finish(self, n: int) -> None:
        """n running rollouts finished and went into the buffer."""
        self._take_running(n)
        self.accepted += n
        self.buffered += n

    def drop_running(self, n: int, reason: str) -> None:
        self._take_running(n)
        self.dropped[reason] += n

    def drop_buffered(self, n: int, reason: str) -> None:
        """n finished rollouts leave the buffer untrained: they give their admission slots back."""
        if n > self.buffered:
            raise RuntimeError(f"drop_buffered({n}) with only {self.buffered} buffered")
        self.buffered -= n
        self.accepted -= n
        self.dropped[reason] += n

    def consume(self, n: int, lags: list[int]) -> None:
        if n > self.buffered:
            raise RuntimeError(f"consume({n}) with only {self.buffered} buffered")
        self.buffered -= n
        self.consumed += n
        if lags:
            self.lag_seen_max = max(self.lag_seen_max, max(lags))

    def set_version(self, version: int) -> None:
        if version < self.version:
            raise RuntimeError(f"policy version may not go back from {self.version} to {version}")
        self.version = version

    def _take_running(self, n: int) -> None:
        if n > self.running:
            raise RuntimeError(f"{n} rollouts reported finished with only {self.running} running")
        self.running -= n

    def accounting(self) -> dict:
        in_flight = self.running + self.buffered
        return {
            "admitted": self.admitted,
            "consumed": self.consumed,
            "dropped": dict(self.dropped),
            "dropped_total": sum(self.dropped.values()),
            "in_flight": in_flight,
            "running": self.running,
            "buffered": self.buffered,
            "policy_version": self.version,
            "max_lag_seen": self.lag_seen_max,
            "identity_holds": self.admitted == self.consumed + sum(self.dropped.values()) + in_flight,
        }

    def state_dict(self) -> dict:
        return {"version": self.version, "admitted": self.admitted, "running": self.running,
                "accepted": self.accepted, "consumed": self.consumed, "buffered": self.buffered,
                "dropped": dict(self.dropped), "lag_seen_max": self.lag_seen_max}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint. Rollouts running or buffered at the checkpoint died with the
        old run and were never trained on: they are un-admitted (the caller re-issues their prompts)."""
        self.version, self.consumed, self.lag_seen_max = state["version"], state["consumed"], state["lag_seen_max"]
        self.dropped = Counter(state["dropped"])
        self.admitted = state["admitted"] - state["running"] - state["buffered"]
        self.accepted = state["accepted"] - state["buffered"]
        self.running = self.buffered = 0
