"""The engine interface every rollout backend implements (vLLM, transformers fallback).

An engine generates one response segment at a time. A segment ends when the model
stops, hits the length limit, or is aborted by `abort_all()` at a weight publish;
the rollout worker then continues an aborted response from the tokens it already has
(interruptible generation, docs/design.md section 6).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from weight_sync.messages import GroupAddress
from weight_sync.plan import Region, SyncPlan


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass
class Segment:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    finish_reason: str  # "stop" | "length" | "abort"


class Engine(abc.ABC):
    """Async generation plus in-place weight loading from a process group."""

    @abc.abstractmethod
    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> Segment:
        """Generate from `prompt_ids`; returns early with finish_reason="abort" if aborted."""

    @abc.abstractmethod
    async def abort_all(self) -> int:
        """Abort every in-flight request; returns how many were aborted."""

    @abc.abstractmethod
    async def weight_sync_regions(self) -> list[Region]:
        """The engine's regions of the weight-sync plan (weight_sync/plan.py): for each parameter it
        serves, in its own names and layout, which trainer tensors fill it."""

    @abc.abstractmethod
    async def init_weight_sync(self, plan: SyncPlan, address: GroupAddress, rank: int) -> None:
        """Set up the receive side of `plan` and join the weight-sync process group at `address` as
        `rank` (trainer rank 0 is the broadcast root)."""

    @abc.abstractmethod
    async def init_weight_sync_ipc(self, plan: SyncPlan, handle: bytes) -> None:
        """Colocated on one GPU: set up `plan` and open the trainer's flat buffer (CUDA IPC handle) once."""

    @abc.abstractmethod
    async def receive_weights(self) -> None:
        """One publish: the trainer's flat buffer into the served weights (a broadcast, or a copy when
        colocated)."""

    @abc.abstractmethod
    async def weights_fingerprint(self) -> str:
        """Layout-independent fingerprint of the weights the engine serves (weight_sync.receive.fingerprint)."""

    def dead(self) -> str | None:
        """Why the engine can serve no more (e.g. its engine process died), or None while it can.
        A dead engine is not rebuilt in place: the rollout worker reports it in `ping`, and the
        driver restarts the whole actor. In-process engines (HF) die with their actor: None."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the engine and its processes."""
