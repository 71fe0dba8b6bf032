"""The engine side of weight sync: a publish's buckets into the served parameters, and the fingerprint.

A `Receiver` is built once per engine worker (one tensor-parallel rank) from the plan. At every
publish it takes part in the trainer's bucket-by-bucket broadcast (`receive`) and copies each bucket
into its parameters' storage, through views computed once, one `torch._foreach_copy_` per bucket;
colocated, it copies every region out of the trainer's flat buffer, opened once through CUDA IPC
(`attach_ipc`, `copy_ipc`). An engine whose loader must see whole tensors (vLLM on CPU) gets the plan
staged in one buffer instead (`staged`).

`fingerprint` is how a publish is verified (weight_sync.verify): a layout-independent digest of a set
of tensors, so the trainer's weights and an engine's fused, sharded, padded copy of them compare equal
exactly when every value arrived.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist

from weight_sync.plan import Region, SyncPlan


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The storage of a contiguous tensor as a flat uint8 view (no copy)."""
    return t.detach().view(-1).view(torch.uint8)


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.current_stream().synchronize()  # a CPU-GPU sync point: every copy has landed


class Receiver:
    """The engine side of a plan, for one tensor-parallel rank.

    With `params` (a name -> parameter map of this worker), every bucket arrives in one of two
    persistent receive buffers of `bucket_bytes` and is copied straight into the parameters' storage
    with one `torch._foreach_copy_`, through (destination, source) views computed here, once: no
    allocation and no per-tensor Python work at publish time, and the parameters keep their storage
    (CUDA graphs captured over it see the new values). The broadcast of bucket k+1 runs while bucket
    k is copied: NCCL runs it on its own stream, which waits only for the copies already queued on
    this one (those out of the same buffer two buckets back); gloo runs it on its own thread.

    Without `params`, the whole plan lands in one persistent buffer and `staged()` gives each region
    as a tensor view of it, for a loader that must see every tensor (vLLM's CPU reload).
    """

    def __init__(self, plan: SyncPlan, tp_rank: int, device: torch.device | str,
                 params: Mapping[str, torch.Tensor] | None = None) -> None:
        self.plan = plan
        self.device = torch.device(device)
        self.mine = [r for r in plan.regions if r.tp_rank == tp_rank]
        self._on_gpu = self.device.type == "cuda" or any(p.is_cuda for p in (params or {}).values())
        buckets = plan.buckets
        if params is None:
            whole = torch.empty(plan.nbytes, dtype=torch.uint8, device=self.device)
            self._staging = whole
            self._slots = [whole[s:e] for s, e in buckets]
            self._copies: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in buckets]
            return
        self._staging = None
        size = max(e - s for s, e in buckets)  # a model smaller than one bucket needs no more
        bufs = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(min(2, len(buckets)))]
        self._slots = [bufs[k % len(bufs)][: e - s] for k, (s, e) in enumerate(buckets)]
        self._dst = {r.param: _destination(r, params) for r in self.mine}
        self._copies = [([], []) for _ in buckets]
        for r in self.mine:
            dst = self._dst[r.param]
            for k in plan.bucket_span(r):
                start, end = buckets[k]
                lo, hi = max(r.offset, start), min(r.offset + r.nbytes, end)
                self._copies[k][0].append(dst[lo - r.offset : hi - r.offset].view(r.torch_dtype))
                self._copies[k][1].append(self._slots[k][lo - start : hi - start].view(r.torch_dtype))
        self._ipc: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def receive(self, group: dist.ProcessGroup) -> int:
        """Take part in one publish's broadcasts (a collective: the trainer and every engine worker) and
        copy every bucket into the parameters. Returns the bytes received."""
        works: list = [None] * len(self._slots)

        def post(k: int) -> None:
            works[k] = group.broadcast(self._slots[k], 0)

        post(0)
        for k in range(len(self._slots)):
            if k + 1 < len(self._slots):
                post(k + 1)  # into the other buffer, once the copies out of it (bucket k-1) are done
            works[k].wait()  # NCCL: this stream waits for the bucket; gloo: this thread does
            works[k] = None
            dsts, srcs = self._copies[k]
            if dsts:
                torch._foreach_copy_(dsts, srcs)
        _sync(self._on_gpu)
        return self.plan.nbytes

    def staged(self) -> list[tuple[str, torch.Tensor]]:
        """(engine parameter name, region view) of this rank, valid until the next `receive`."""
        if self._staging is None:
            raise RuntimeError("Receiver.staged() needs a Receiver built without params")
        return [(r.param, r.view(self._staging)) for r in self.mine]

    def attach_ipc(self, flat: torch.Tensor) -> None:
        """Colocated: `flat` is the trainer's flat buffer (opened once through CUDA IPC); every later
        `copy_ipc` copies from it."""
        if flat.numel() < self.plan.nbytes:
            raise ValueError(f"the trainer's flat buffer holds {flat.numel()} bytes, the plan {self.plan.nbytes}")
        self._ipc = ([self._dst[r.param].view(r.torch_dtype) for r in self.mine],
                     [flat[r.offset : r.offset + r.nbytes].view(r.torch_dtype) for r in self.mine])

    def copy_ipc(self) -> int:
        """One device-to-device copy of every region of this rank out of the trainer's buffer."""
        if self._ipc is None:
            raise RuntimeError("Receiver.copy_ipc before attach_ipc")
        torch._foreach_copy_(*self._ipc)
        _sync(self._on_gpu)  # the trainer may pack the next version once every engine returned
        return self.plan.nbytes


def _destination(r: Region, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The bytes of parameter `r.param` that region `r` fills (its leading rows), as a flat uint8 view."""
    p = params.get(r.param)
    where = f"weight sync plan: engine parameter {r.param}"
    if p is None:
        raise ValueError(f"{where} is not in this engine worker's model")
    if str(p.dtype).removeprefix("torch.") != r.dtype:
        raise ValueError(f"{where} is {p.dtype}, the plan says {r.dtype}")
    if not p.is_contiguous():
        raise ValueError(f"{where} is not contiguous; its storage cannot be written through a flat view")
    if tuple(p.shape[1:]) != r.shape[1:] or (r.shape and r.shape[0] > p.shape[0]) or (not r.shape and p.dim()):
        raise ValueError(f"{where} has shape {list(p.shape)}; the plan fills {list(r.shape)} of it")
    return _flat_bytes(p.data)[: r.nbytes]


_K1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_K2 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
_MASK = (1 << 64) - 1


def fingerprint(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> str:
    """Bit-exact fingerprint of a set of tensors that does not depend on their layout.

    Each element's bit pattern is mixed by a 64-bit hash and the hashes are summed
    (a multiset hash), so concatenating q/k/v into one fused tensor, reordering
    parameters, or padding with +0.0 rows (hash(0) = 0) leaves it unchanged, while a
    change of any single bit changes it. The trainer and an engine that stores the same
    values in a different layout (vLLM fuses qkv and gate/up) get the same string.
    """
    acc = 0
    count = 0
    for t in tensors:
        t = t.detach().to("cpu")
        if dtype is not None:
            t = t.to(dtype)
        t = t.contiguous().view(-1)
        int_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        x = t.view(int_view).to(torch.int64)
        if t.element_size() < 8:
            x = x & ((1 << (8 * t.element_size())) - 1)  # unsigned bit pattern
        h = x * _K1
        h = h ^ (h >> 29)
        h = h * _K2
        h = h ^ (h >> 32)
        acc = (acc + int(h.sum())) & _MASK
        count += int((x != 0).sum())
    return hashlib.sha256(f"{acc}:{count}".encode()).hexdigest()[:16]
