"""Data parallelism of the trainer workers: one torch.distributed group, FSDP2 sharding.

    init_trainer_group(host, port, rank, world_size, backend, timeout_s)
    shard(model)                      # FSDP2 `fully_shard` per decoder layer, then the root
    full(t) / local(t)                # the whole tensor (a collective on sharded params) / this rank's shard
    shard_of(full_tensor, like)       # this rank's part of a full tensor, laid out like parameter `like`
    all_reduce_sum(values)            # sum a tensor (or list) of floats over the ranks

Every rank receives the whole batch and computes the same advantages; each trains on its share
of the trajectories. Every micro-batch loss is divided by the global token count and multiplied
by the world size before backward, because FSDP's gradient reduction averages over the ranks
(gloo has no pre-multiplied sum to turn that off): the gradient is then the global token-mean
of docs/design.md section 3 whatever the number of workers.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def uses_fsdp(fsdp: bool | None, world_size: int, mixed_precision: bool = False) -> bool:
    """trainer.fsdp, or (unset) whether there is more than one trainer worker or the trainer computes in
    bf16/fp16 on a GPU (FSDP2's mixed precision, which needs a process group even for one rank)."""
    return fsdp if fsdp is not None else (world_size > 1 or mixed_precision)


def init_trainer_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
    if dist.is_initialized():
        raise RuntimeError("this trainer process already belongs to a torch.distributed group")
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (also under a PEFT wrapper)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers to shard (no `.layers` on the "
                         "decoder); use trainer.fsdp=false with one trainer worker")
    return list(layers)


def shard(model: torch.nn.Module, compute_dtype: torch.dtype | None = None, mesh=None) -> torch.nn.Module:
    """FSDP2: shard every decoder layer and the rest of the model over the trainer group. With a
    `compute_dtype` (bf16 on GPU), parameters are gathered in that dtype for forward and backward while
    the sharded float32 masters, the optimizer and the gradient reduction stay in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor. For a sharded parameter this all-gathers: every rank must call it."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the tensor itself when not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_of(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of `whole`, split like parameter `like` (no communication: every rank has `whole`)."""
    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def all_reduce_sum(values: torch.Tensor | list[float], device: torch.device) -> list[float]:
    """Sum over the ranks (one collective), returned as Python floats (one device-to-host copy)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
