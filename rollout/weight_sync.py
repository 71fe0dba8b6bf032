"""Weight movement from trainer rank 0 to every engine worker (DESIGN.md section 6).

One dedicated process group joins trainer rank 0 (rank 0, the broadcast root) and
every engine worker (ranks 1..R). It is built from its own TCPStore, so it lives
beside whatever default group a process already has (vLLM workers have one). The
same code takes gloo on CPU and NCCL on GPU.

Parameters travel in buckets of about `bucket_bytes`: each bucket is the raw bytes
of consecutive tensors concatenated into one uint8 buffer, so one collective moves
many small tensors and mixed dtypes need no special case.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParamMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32", "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.torch_dtype).element_size()


def metas_of(named: Iterable[tuple[str, torch.Tensor]]) -> list[ParamMeta]:
    return [ParamMeta(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in named]


def plan_buckets(metas: list[ParamMeta], bucket_bytes: int) -> list[list[int]]:
    """Split parameter indices into consecutive buckets of at most `bucket_bytes`
    (a single tensor larger than that gets a bucket of its own)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, m in enumerate(metas):
        if current and size + m.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += m.nbytes
    if current:
        buckets.append(current)
    return buckets


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


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def broadcast_send(
    group: dist.ProcessGroup,
    tensors: list[torch.Tensor],
    metas: list[ParamMeta],
    bucket_bytes: int,
) -> int:
    """Root side: broadcast every tensor (already in the dtype of its meta); returns bytes sent."""
    sent = 0
    for bucket in plan_buckets(metas, bucket_bytes):
        buf = torch.cat([_as_bytes(tensors[i]) for i in bucket])
        group.broadcast(buf, 0).wait()  # blocks until every receiver has the bucket
        sent += buf.numel()
    return sent


def broadcast_recv(
    group: dist.ProcessGroup, metas: list[ParamMeta], bucket_bytes: int, device: torch.device | str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: yields (name, tensor) as each bucket arrives, so loading overlaps nothing
    but never holds more than one bucket beyond the model itself."""
    for bucket in plan_buckets(metas, bucket_bytes):
        total = sum(metas[i].nbytes for i in bucket)
        buf = torch.empty(total, dtype=torch.uint8, device=device)
        group.broadcast(buf, 0).wait()
        offset = 0
        for i in bucket:
            m = metas[i]
            chunk = buf[offset : offset + m.nbytes]
            offset += m.nbytes
            yield m.name, chunk.view(m.torch_dtype).view(m.shape)


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


# ---- colocated: trainer and engine on one GPU -----------------------------------------------
# NCCL cannot join two ranks on one device, and a copy through the host would waste the
# point of sharing a GPU. The trainer packs each bucket into a CUDA buffer and hands out CUDA
# IPC handles (torch.multiprocessing's reduction of a CUDA tensor); the engine opens them and
# loads straight from the trainer's memory: device-to-device, no host copy, no extra
# collective. The handles are pickled once into bytes so that they cross vLLM's RPC layer,
# which serialises only plain values; they come from our own trainer process, never from
# user input.


def ipc_pack(tensors: list[torch.Tensor], metas: list[ParamMeta], bucket_bytes: int) -> tuple[list[torch.Tensor], bytes]:
    """Sender: (buffers to keep alive until every receiver loaded them, pickled IPC handles)."""
    import pickle

    from torch.multiprocessing.reductions import reduce_tensor

    buffers = [torch.cat([_as_bytes(tensors[i]) for i in bucket]) for bucket in plan_buckets(metas, bucket_bytes)]
    if buffers and not buffers[0].is_cuda:
        raise RuntimeError("weight_sync.backend=ipc needs the trainer on a GPU (colocated with the engine)")
    return buffers, pickle.dumps([reduce_tensor(b) for b in buffers])


def ipc_unpack(handles: bytes, metas: list[ParamMeta], bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver: yields (name, tensor) views into the sender's buffers (valid until the sender frees them)."""
    import pickle

    device = torch.cuda.current_device()  # colocated: the sender's GPU is this process's current one
    for bucket, (rebuild, args) in zip(plan_buckets(metas, bucket_bytes), pickle.loads(handles)):
        args = list(args)
        args[6] = device  # the sender's device index; the same GPU may have another index here
        buf = rebuild(*args)
        offset = 0
        for i in bucket:
            m = metas[i]
            yield m.name, buf[offset : offset + m.nbytes].view(m.torch_dtype).view(m.shape)
            offset += m.nbytes


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
