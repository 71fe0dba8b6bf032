"""What crosses processes in a weight sync, as typed, frozen messages.

| message | from -> to | when |
| --- | --- | --- |
| `list[Region]` (plan.py) | each engine -> driver | setup: every parameter it serves and what fills it |
| `SyncPlan` (plan.py) | driver -> every trainer rank and engine | setup (again to an engine restarted later) |
| `GroupAddress` | driver -> trainer rank 0 and every engine | each time the weight-sync group is formed |
| CUDA IPC handle, `bytes` (transport.py) | trainer rank 0 -> every engine | setup, colocated only |
| `SendReport` | trainer rank 0 -> driver | every publish: bytes filled (and sent), seconds |
| `PublishReport` | each rollout worker -> driver | every publish: requests interrupted, seconds paused and receiving |

Between Ray actors the messages travel as they are: Ray pickles them, and every process of a run
imports this package. The one exception is vLLM's `collective_rpc`, between an engine and its own
worker processes: vLLM carries its arguments and results with msgpack, which delivers a dataclass as
a plain dict (its class lost on the way) and refuses other classes it does not know (pickle only with
VLLM_ALLOW_INSECURE_SERIALIZATION, which we do not ask users to set). The `*_to_rpc` / `*_from_rpc`
functions at the end of this module are the only place a message becomes lists, dicts and numbers,
and back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from weight_sync.plan import Piece, Region, SyncPlan


@dataclass(frozen=True)
class GroupAddress:
    """Where and how the weight-sync group forms: rank 0 (the trainer) hosts its TCPStore at
    `host:port`; `world_size` ranks join within `timeout_s` (weight_sync.timeout_s) over `backend`
    ("gloo" or "nccl", weight_sync.backend)."""

    host: str
    port: int
    world_size: int
    backend: str
    timeout_s: float


@dataclass(frozen=True)
class SendReport:
    """The trainer's side of one publish (rank 0): the flat buffer's bytes filled (and broadcast),
    and the seconds it took."""

    nbytes: int
    seconds: float


@dataclass(frozen=True)
class PublishReport:
    """One rollout worker's side of one publish: the requests it interrupted, the seconds until they
    were paused, and the seconds receiving the weights into its engine."""

    interrupted: int
    pause_s: float
    receive_s: float


# ---- vLLM's RPC boundary: plain values only (see the module docstring) ------------------------
def regions_to_rpc(regions: Iterable[Region]) -> list[list]:
    return [[r.param, r.tp_rank, list(r.shape), r.dtype, r.offset,
             [[p.source, p.dim, p.src_start, p.dst_start, p.length] for p in r.pieces]] for r in regions]


def regions_from_rpc(rows: Iterable[list]) -> list[Region]:
    regions = []
    for param, tp_rank, shape, dtype, offset, pieces in rows:
        regions.append(Region(param, int(tp_rank), tuple(int(s) for s in shape), dtype,
                              tuple(Piece(s, None if d is None else int(d), int(a), int(b), int(n))
                                    for s, d, a, b, n in pieces), int(offset)))
    return regions


def plan_to_rpc(plan: SyncPlan) -> dict:
    return {"bucket_bytes": plan.bucket_bytes, "nbytes": plan.nbytes, "regions": regions_to_rpc(plan.regions)}


def plan_from_rpc(d: dict) -> SyncPlan:
    return SyncPlan(tuple(regions_from_rpc(d["regions"])), int(d["bucket_bytes"]), int(d["nbytes"]))


def address_to_rpc(address: GroupAddress) -> dict:
    return asdict(address)


def address_from_rpc(d: dict) -> GroupAddress:
    return GroupAddress(**d)
