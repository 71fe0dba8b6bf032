"""The engine interface every rollout backend implements (vLLM, transformers fallback).

An engine generates one response segment at a time. A segment ends when the model
stops, hits the length limit, or is aborted by `abort_all()` at a weight publish;
the rollout worker then continues an aborted response from the tokens it already has
(interruptible generation, DESIGN.md section 6).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from rollout.weight_sync import ParamMeta


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
    async def init_weight_sync(
        self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Join the weight-sync process group (trainer rank 0 is the broadcast root)."""

    @abc.abstractmethod
    async def receive_weights(self, metas: list[ParamMeta], bucket_bytes: int) -> None:
        """Receive a full broadcast of the parameters described by `metas` and load them."""

    @abc.abstractmethod
    async def receive_weights_ipc(self, handles: bytes, metas: list[ParamMeta], bucket_bytes: int) -> None:
        """Colocated on one GPU: load from the trainer's CUDA buffers through IPC handles."""

    @abc.abstractmethod
    async def weights_fingerprint(self) -> str:
        """Layout-independent fingerprint of the weights the engine serves (see weight_sync)."""

    def dead(self) -> str | None:
        """Why the engine can serve no more (e.g. its engine process died), or None while it can.
        A dead engine is not rebuilt in place: the rollout worker reports it in `ping`, and the
        driver restarts the whole actor. In-process engines (HF) die with their actor: None."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the engine and its processes."""
