"""The weight-sync plan: which trainer tensors fill which engine parameter, and where in the flat buffer.

For every parameter an engine worker holds (the engine's own names and layouts: vLLM's fused
`qkv_proj` and `gate_up_proj`, the vocabulary rows of a padded embedding, the shard of each
tensor-parallel rank) the engine says which trainer tensors and which slices of them fill it, and in
which dtype (`Region`, `Piece`). `SyncPlan.build` lays the regions out end to end in one flat byte
buffer (each `ALIGN`-byte aligned) and cuts that into buckets of `bucket_bytes`.

The engines report their regions at setup, the driver builds the plan from them (every engine of a run
must report the same), and the trainer (`send.py`) and every engine worker (`receive.py`) compute
their views of the flat buffer from it, once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

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
    def build(cls, regions: Iterable[Region], bucket_bytes: int) -> SyncPlan:
        bucket_bytes = max(ALIGN, bucket_bytes // ALIGN * ALIGN)  # a cut never splits an element
        laid, offset = [], 0
        for r in regions:
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

    def summary(self) -> str:
        params = len({r.param for r in self.regions})
        return (f"{params} engine parameters in {len(self.regions)} regions, {self.nbytes / 2**20:.1f} MiB in "
                f"{len(self.buckets)} bucket(s) of {self.bucket_bytes / 2**20:g} MiB")


def merge_tp_regions(per_rank: Sequence[Sequence[Region]]) -> list[Region]:
    """One engine's regions from the lists of its tensor-parallel workers: parameter by parameter in
    rank 0's order, each followed by the same parameter's shard on the other ranks."""
    by_rank = [{r.param: r for r in regions} for regions in per_rank]
    names = list(dict.fromkeys(r.param for regions in per_rank for r in regions))
    return [ranked[n] for n in names for ranked in by_rank if n in ranked]


def whole_tensor_regions(named: Iterable[tuple[str, torch.Tensor]]) -> list[Region]:
    """The plan of an engine that stores the trainer's tensors as they are (same names, no fusing, no
    sharding): one region per tensor, filled by the tensor of the same name."""
    return [Region(n, 0, tuple(t.shape), str(t.dtype).removeprefix("torch."), (Piece(n, None),)) for n, t in named]
