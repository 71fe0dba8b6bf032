"""Weight movement from the trainer to every engine worker (DESIGN.md section 6).

A publish moves one flat buffer, laid out once for the engine at setup:

* **The plan** (`SyncPlan`). For every parameter an engine worker holds (the engine's own names and
  layouts: vLLM's fused `qkv_proj` and `gate_up_proj`, the vocabulary rows of a padded embedding, the
  shard of each tensor-parallel rank) the engine says which trainer tensors and which slices of them
  fill it, and in which dtype (`Region`, `Piece`). The plan lays the regions out end to end in one
  flat byte buffer (each 256-byte aligned) and cuts that into buckets of `bucket_bytes`.
* **The trainer** (trainer/publisher.py) keeps that flat buffer, casts and fuses its tensors into
  views of it, and broadcasts it bucket by bucket.
* **The engine** (`Receiver`) receives each bucket into a persistent receive buffer and copies it
  into its parameters' storage through views computed once, one `torch._foreach_copy_` per bucket.

One dedicated process group joins the trainer (rank 0, the broadcast root) and every engine worker
(ranks 1..R). It is built from its own TCPStore, so it lives beside whatever default group a process
already has (vLLM workers have one). The same code takes gloo on CPU and NCCL on GPU. Colocated on
one GPU, the engine opens the trainer's flat buffer once through a CUDA IPC handle and each publish
is a device-to-device copy.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import pickle
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

ALIGN = 256  # bytes: every region starts on this boundary (aligned, vectorised copies)


@dataclass(frozen=True)
class Piece:
    """`source.narrow(dim, src_start, length)` fills `region.narrow(dim, dst_start, length)`;
    `dim=None`: the whole source fills the whole region."""

    source: str  # the trainer's (checkpoint) name, e.g. "model.layers.0.self_attn.k_proj.weight"
    dim: int | None
    src_start: int = 0
    dst_start: int = 0
    length: int = 0


@dataclass(frozen=True)
class Region:
    """What one engine worker's parameter receives: `shape` leading rows of it (all of it but the
    vocabulary padding rows, which stay 0), filled by `pieces`, at byte `offset` of the flat buffer."""

    param: str  # the engine's parameter name, e.g. "model.layers.0.self_attn.qkv_proj.weight"
    tp_rank: int  # the tensor-parallel worker of an engine that holds it
    shape: tuple[int, ...]
    dtype: str  # e.g. "bfloat16"
    pieces: tuple[Piece, ...]
    offset: int = -1  # set by SyncPlan.build

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.torch_dtype).element_size()

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This region of a flat uint8 buffer, as a tensor of its dtype and shape."""
        return flat[self.offset : self.offset + self.nbytes].view(self.torch_dtype).view(self.shape)

    def check(self) -> None:
        """The pieces tile the region exactly once (along one dimension, or one whole piece)."""
        where = f"weight sync plan: region {self.param} (tp rank {self.tp_rank}, shape {list(self.shape)})"
        if not self.pieces:
            raise ValueError(f"{where} has no source")
        if any(p.dim is None for p in self.pieces):
            if len(self.pieces) != 1:
                raise ValueError(f"{where}: a whole-tensor piece must be the only one")
            return
        dims = {p.dim for p in self.pieces}
        if len(dims) != 1 or not 0 <= next(iter(dims)) < len(self.shape):
            raise ValueError(f"{where}: pieces along dimensions {sorted(dims)}; one dimension of the region expected")
        dim = dims.pop()
        end = 0
        for p in sorted(self.pieces, key=lambda p: p.dst_start):
            if p.dst_start != end or p.length <= 0 or p.src_start < 0:
                raise ValueError(f"{where}: pieces leave a gap or overlap at {p.dst_start} along dim {dim}")
            end += p.length
        if end != self.shape[dim]:
            raise ValueError(f"{where}: pieces cover {end} of {self.shape[dim]} along dim {dim}")


@dataclass(frozen=True)
class SyncPlan:
    """The regions of every engine worker in engine order, laid out in one flat buffer of `nbytes`,
    sent in buckets of `bucket_bytes` (the last one shorter). Every engine of a run has the same plan."""

    regions: tuple[Region, ...]
    bucket_bytes: int
    nbytes: int

    @classmethod
    def build(cls, regions: Iterable[Region | list], bucket_bytes: int) -> SyncPlan:
        bucket_bytes = max(ALIGN, bucket_bytes // ALIGN * ALIGN)  # a cut never splits an element
        laid, offset = [], 0
        for r in map(region_from_plain, regions):
            if r.nbytes == 0:  # e.g. a tensor-parallel rank holding only vocabulary padding rows
                continue
            r.check()
            laid.append(replace(r, offset=offset))
            offset += -(-r.nbytes // ALIGN) * ALIGN
        if not laid:
            raise ValueError("weight sync plan: the engine reported no parameters to fill")
        return cls(tuple(laid), bucket_bytes, offset)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(start, end) byte range of each bucket."""
        return [(s, min(s + self.bucket_bytes, self.nbytes)) for s in range(0, self.nbytes, self.bucket_bytes)]

    def bucket_span(self, r: Region) -> range:
        """The buckets a region overlaps."""
        return range(r.offset // self.bucket_bytes, (r.offset + r.nbytes - 1) // self.bucket_bytes + 1)

    def source_uses(self) -> dict[str, int]:
        """Trainer tensor name -> pieces reading it."""
        count: dict[str, int] = {}
        for r in self.regions:
            for p in r.pieces:
                count[p.source] = count.get(p.source, 0) + 1
        return count

    def to_plain(self) -> dict:
        """Lists and numbers only: crosses Ray and vLLM's RPC without unpickling our classes."""
        return {"bucket_bytes": self.bucket_bytes, "nbytes": self.nbytes,
                "regions": [region_to_plain(r) for r in self.regions]}

    @classmethod
    def from_plain(cls, d: dict | SyncPlan) -> SyncPlan:
        if isinstance(d, SyncPlan):
            return d
        return cls(tuple(region_from_plain(r) for r in d["regions"]), int(d["bucket_bytes"]), int(d["nbytes"]))

    def summary(self) -> str:
        params = len({r.param for r in self.regions})
        return (f"{params} engine parameters in {len(self.regions)} regions, {self.nbytes / 2**20:.1f} MiB in "
                f"{len(self.buckets)} bucket(s) of {self.bucket_bytes / 2**20:g} MiB")


def region_to_plain(r: Region) -> list:
    return [r.param, r.tp_rank, list(r.shape), r.dtype, r.offset,
            [[p.source, p.dim, p.src_start, p.dst_start, p.length] for p in r.pieces]]


def region_from_plain(x: list | Region) -> Region:
    if isinstance(x, Region):
        return x
    param, tp_rank, shape, dtype, offset, pieces = x
    return Region(param, int(tp_rank), tuple(int(s) for s in shape), dtype,
                  tuple(Piece(s, None if d is None else int(d), int(a), int(b), int(n)) for s, d, a, b, n in pieces),
                  int(offset))


def merge_tp_regions(per_rank: Sequence[Sequence]) -> list[Region]:
    """One engine's regions from the lists of its tensor-parallel workers: parameter by parameter in
    rank 0's order, each followed by the same parameter's shard on the other ranks."""
    per_rank = [[region_from_plain(r) for r in regions] for regions in per_rank]
    by_rank = [{r.param: r for r in regions} for regions in per_rank]
    names = list(dict.fromkeys(r.param for regions in per_rank for r in regions))
    return [ranked[n] for n in names for ranked in by_rank if n in ranked]


def whole_tensor_regions(named: Iterable[tuple[str, torch.Tensor]]) -> list[Region]:
    """The plan of an engine that stores the trainer's tensors as they are (same names, no fusing, no
    sharding): one region per tensor, filled by the tensor of the same name."""
    return [Region(n, 0, tuple(t.shape), str(t.dtype).removeprefix("torch."), (Piece(n, None),)) for n, t in named]


def free_address() -> tuple[str, int]:
    """This node's address and a free TCP port: where a group's rank 0 hosts its store."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def make_group(
    backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float
) -> dist.ProcessGroup:
    """A standalone process group (not the default one) over a fresh TCPStore.

    Rank 0 hosts the store. Every rank blocks here until all `world_size` ranks joined
    or `timeout_s` passed.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"weight_sync.backend={backend!r} must be 'gloo' or 'nccl'")


def warm_up(group: dist.ProcessGroup, device: torch.device) -> None:
    """One tiny broadcast from rank 0, by every member right after the group formed: NCCL builds its
    communicator on the first collective (hundreds of ms), which then happens at setup, not in the
    first publish."""
    t = torch.zeros(1, device=device)
    group.broadcast(t, 0).wait()
    if device.type == "cuda":
        torch.cuda.current_stream().synchronize()


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


# ---- colocated: trainer and engine on one GPU -----------------------------------------------
# NCCL cannot join two ranks on one device, and a copy through the host would waste the point of
# sharing a GPU. The trainer hands out a CUDA IPC handle of its flat buffer (torch.multiprocessing's
# reduction of a CUDA tensor), once; each engine opens it once and keeps it, and every publish is a
# device-to-device copy out of it. The handle is pickled into bytes so that it crosses vLLM's RPC
# layer, which serialises only plain values; it comes from our own trainer process, never from user
# input.


def ipc_handle(flat: torch.Tensor) -> bytes:
    """Sender: the pickled CUDA IPC handle of `flat`; the buffer must stay alive as long as engines use it."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not flat.is_cuda:
        raise RuntimeError("weight_sync.backend=ipc needs the trainer on a GPU (colocated with the engine)")
    return pickle.dumps(reduce_tensor(flat))


def open_ipc(handle: bytes) -> torch.Tensor:
    """Receiver: the sender's buffer, mapped into this process (no copy)."""
    rebuild, args = pickle.loads(handle)
    args = list(args)
    args[6] = torch.cuda.current_device()  # the sender's device index; the same GPU may have another index here
    return rebuild(*args)


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



class TransferProbe:
    """Ray actor: the bare cost of moving `nbytes` by a weight-sync route (scripts/bench.py), nothing else:
    no cast to the engine dtype, no packing of parameters, no loading into an engine. The
    physical limit a publish of the same bytes is compared with."""

    def __init__(self, device: str | None = None) -> None:
        # default: the GPU Ray assigned (it hides the others), else the CPU
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.group = None

    def address(self) -> tuple[str, int]:
        return free_address()

    def join(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        self.group = make_group(backend, host, port, rank, world_size, timeout_s)

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
