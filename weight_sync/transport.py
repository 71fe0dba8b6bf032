"""How the bytes of a publish move: a dedicated process group, or CUDA IPC when colocated.

One dedicated process group joins the trainer (rank 0, the broadcast root) and every engine worker
(ranks 1..R). It is built from its own TCPStore (`make_group`, at the `GroupAddress` the driver hands
out), so it lives beside whatever default group a process already has (vLLM workers have one). The
same code takes gloo on CPU and NCCL on GPU; every member broadcasts one tiny tensor right after
joining (`warm_up`), so NCCL builds its communicator at setup rather than in the first publish.

Colocated on one GPU, NCCL cannot join two ranks on one device, and a copy through the host would
waste the point of sharing a GPU. The trainer hands out a CUDA IPC handle of its flat buffer
(torch.multiprocessing's reduction of a CUDA tensor), once (`ipc_handle`); each engine opens it once
and keeps it (`open_ipc`), and every publish is a device-to-device copy out of it. The handle is
pickled into bytes so that it crosses vLLM's RPC layer, which serialises only plain values; it comes
from our own trainer process, never from user input.
"""

from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist

from weight_sync.messages import GroupAddress


def free_address() -> tuple[str, int]:
    """This node's address and a free TCP port: where a group's rank 0 hosts its store."""
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def make_group(address: GroupAddress, rank: int) -> dist.ProcessGroup:
    """A standalone process group (not the default one) over a fresh TCPStore.

    Rank 0 hosts the store. Every rank blocks here until all `address.world_size` ranks joined
    or `address.timeout_s` passed.
    """
    timeout = datetime.timedelta(seconds=address.timeout_s)
    store = dist.TCPStore(address.host, address.port, address.world_size, is_master=(rank == 0), timeout=timeout)
    if address.backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, address.world_size, timeout)
    if address.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, address.world_size, opts)
    raise ValueError(f"weight_sync.backend={address.backend!r} must be 'gloo' or 'nccl'")


def warm_up(group: dist.ProcessGroup, device: torch.device) -> None:
    """One tiny broadcast from rank 0, by every member right after the group formed: NCCL builds its
    communicator on the first collective (hundreds of ms), which then happens at setup, not in the
    first publish."""
    t = torch.zeros(1, device=device)
    group.broadcast(t, 0).wait()
    if device.type == "cuda":
        torch.cuda.current_stream().synchronize()


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
