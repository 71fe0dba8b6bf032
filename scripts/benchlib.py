"""Bench-only helpers of scripts/bench.py, kept out of the packages a training run imports.

* `TransferProbe` (Ray actor, or a plain object for one copy): the bare cost of moving the weight-sync
  bytes by the route a publish takes, to compare a publish with.
* `BenchRolloutWorker` (Ray actor): a rollout worker that can also generate alone, without a staleness
  service, a trainer or publishes: the most its engine can feed the trainer.

scripts/ is not a package, and this module's directory is on a Ray worker's import path only when
bench.py runs as a script (Ray adds the driver script's directory), not when a test loads bench.py.
So this module is registered with Ray's cloudpickle to travel by value: its classes reach the workers
whatever their path, while what they build on (`rollout`, `weight_sync`) is imported there by name.
"""

from __future__ import annotations

import asyncio
import sys
import time

import ray.cloudpickle
import torch

from rollout.trajectory import Trajectory
from rollout.worker import RolloutWorker
from weight_sync.messages import GroupAddress
from weight_sync.transport import free_address, make_group

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class TransferProbe:
    """Ray actor: the bare cost of moving `nbytes` by a weight-sync route, nothing else: no cast to the
    engine dtype, no packing of parameters, no loading into an engine. The physical limit a publish of
    the same bytes is compared with."""

    def __init__(self, device: str | None = None) -> None:
        # default: the GPU Ray assigned (it hides the others), else the CPU
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.group = None

    def address(self) -> tuple[str, int]:
        return free_address()

    def join(self, address: GroupAddress, rank: int) -> None:
        self.group = make_group(address, rank)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # a CPU-GPU sync point: the bytes have arrived

    def broadcast(self, nbytes: int, bucket_bytes: int, repeats: int) -> list[float]:
        """Seconds of each of `repeats` broadcasts of `nbytes` from rank 0, in buckets of `bucket_bytes`
        (one warm-up first, not returned). Every rank calls it; each returns its own times."""
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # (nbytes,)
        times = []
        for _ in range(repeats + 1):
            self._sync()
            t0 = time.perf_counter()
            for start in range(0, nbytes, bucket_bytes):
                self.group.broadcast(buf[start : start + bucket_bytes], 0).wait()
            self._sync()
            times.append(time.perf_counter() - t0)
        return times[1:]

    def copy(self, nbytes: int, repeats: int) -> list[float]:
        """Seconds of each of `repeats` device-to-device copies of `nbytes` (the colocated route's limit)."""
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # (nbytes,)
        dst = torch.empty_like(src)
        times = []
        for _ in range(repeats + 1):
            self._sync()
            t0 = time.perf_counter()
            dst.copy_(src)
            self._sync()
            times.append(time.perf_counter() - t0)
        return times[1:]


class BenchRolloutWorker(RolloutWorker):
    """Ray actor (async): a `RolloutWorker` plus `generate_standalone`, which runs in the worker's own
    process, on its engine and event loop."""

    async def generate_standalone(self, tickets: list[dict], concurrency: int | None = None) -> dict:
        """Generate and score the groups of `tickets` alone: no staleness service, no trainer, no publish,
        `concurrency` groups at once (default rollout.max_concurrent_groups). The upper bound on what this
        worker can feed the trainer. Returns token counts (prompt + response, as the trainer counts
        consumed tokens) and the wall time."""
        queue = list(reversed(tickets))
        trajs: list[Trajectory] = []

        async def loop() -> None:
            while queue:
                trajs.extend(await self._rollout_group(queue.pop()))

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency or self.cfg.rollout.max_concurrent_groups)))
        seconds = time.perf_counter() - t0
        trained = [t for t in trajs if not t.is_baseline]
        return {"trajectories": len(trained), "tokens": sum(t.num_tokens for t in trained),
                "response_tokens": sum(len(t.response_ids) for t in trained), "seconds": seconds}
