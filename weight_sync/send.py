"""The trainer side of weight sync: one flat buffer in the engine's layout, filled and sent per publish.

    pub = Publisher(named_for_engine, shapes, static, rank, device)
    pub.set_plan(plan)           # once (every trainer rank): validate, allocate the flat buffer, build views
    pub.join(address)            # rank 0: the weight-sync group (a GroupAddress from the driver)
    pub.publish()                # fill and broadcast, bucket by bucket; rank 0 returns a SendReport
    pub.pack(); pub.ipc_handle() # colocated: fill only; the engines copy out of the buffer

The plan (plan.py `SyncPlan`) comes from the engines: for every parameter they serve,
which of our tensors (and which slices) fill it, at which offset of the flat buffer, in which dtype.
Rank 0 allocates the flat buffer once, in the engine dtype; a publish casts our float32 master
weights into views of it (q/k/v and gate/up land side by side where the engine fuses them, each
tensor-parallel shard where that rank reads it), so a publish allocates nothing and concatenates
nothing.

Two ways to fill it:
* static (one trainer worker, no LoRA): the sources are the parameters themselves, whose storage
  never moves, so (destination, source) views are built once and each bucket is one
  `torch._foreach_copy_` (cast included);
* streamed (FSDP or LoRA): the full tensors come from `named_for_engine()` (FSDP gathers them,
  LoRA merges W + s·B·A), in the model's order, on every rank (the gathers are collectives); rank 0
  copies each into its views as it arrives, then lets it go.

Bucket k is broadcast as soon as every region overlapping it is filled, while later buckets are
still being filled: on GPU NCCL runs the broadcast on its own stream, which waits only for the
copies queued before it, so packing bucket k+1 overlaps sending bucket k; with gloo the broadcast
runs on gloo's thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

import torch

from weight_sync.messages import GroupAddress, SendReport
from weight_sync.plan import SyncPlan
from weight_sync.transport import ipc_handle, make_group, warm_up

log = logging.getLogger(__name__)

Named = Callable[[], Iterator[tuple[str, torch.Tensor]]]


class Publisher:
    """named_for_engine: every (name, full tensor) the engines serve, in the model's order (every rank
    iterates it; rank 0 uses it). shapes: name -> global shape, known without a gather. static: name ->
    the persistent tensor, when the parameters are the sources (one worker, no LoRA), else None."""

    def __init__(self, named_for_engine: Named, shapes: Mapping[str, tuple[int, ...]],
                 static: Mapping[str, torch.Tensor] | None, rank: int, device: torch.device) -> None:
        self.named_for_engine = named_for_engine
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.static = dict(static) if static is not None else None
        self.rank = rank
        self.device = device
        self.plan: SyncPlan | None = None
        self.flat: torch.Tensor | None = None
        self.group = None

    # ---- setup -------------------------------------------------------------------------
    def set_plan(self, plan: SyncPlan) -> None:
        """Check the plan against our tensors, then (rank 0) allocate the flat buffer and its views."""
        self._check(plan)
        self.plan = plan
        if self.rank != 0:
            return
        if self.flat is None or self.flat.numel() != plan.nbytes:
            self.flat = torch.zeros(plan.nbytes, dtype=torch.uint8, device=self.device)  # (nbytes,), once
        views = [r.view(self.flat) for r in plan.regions]
        # per source: (region index, destination view, piece); streamed sources fill these as they arrive
        self._targets: dict[str, list[tuple[int, torch.Tensor, tuple]]] = {}
        for j, (r, view) in enumerate(zip(plan.regions, views)):
            for p in r.pieces:
                dst = view if p.dim is None else view.narrow(p.dim, p.dst_start, p.length)
                self._targets.setdefault(p.source, []).append((j, dst, (p.dim, p.src_start, p.length)))
        # the first bucket each region overlaps: it is filled before that bucket is sent
        self._first_bucket = [plan.bucket_span(r)[0] for r in plan.regions]
        self._last_bucket = [plan.bucket_span(r)[-1] for r in plan.regions]
        self._static_views = None
        log.info("weight sync plan: %s", plan.summary())

    def _check(self, plan: SyncPlan) -> None:
        """Every piece reads an existing tensor within its bounds, and every tensor is sent somewhere."""
        for r in plan.regions:
            for p in r.pieces:
                shape = self.shapes.get(p.source)
                where = f"weight sync plan: engine parameter {r.param} (tp rank {r.tp_rank}) reads {p.source}"
                if shape is None:
                    raise ValueError(f"{where}, which the trainer's model does not have: the engine serves "
                                     "another architecture or vocabulary than the trainer trains")
                if p.dim is None:
                    ok = shape == r.shape
                else:
                    rest_src = shape[:p.dim] + shape[p.dim + 1:]
                    rest_dst = r.shape[:p.dim] + r.shape[p.dim + 1:]
                    ok = p.dim < len(shape) and rest_src == rest_dst and p.src_start + p.length <= shape[p.dim]
                if not ok:
                    raise ValueError(f"{where} {'whole' if p.dim is None else f'[{p.src_start}:{p.src_start + p.length}] along dim {p.dim}'}"
                                     f" into shape {list(r.shape)}, but the trainer's tensor has shape {list(shape)}")
        unused = set(self.shapes) - set(plan.source_uses())
        if unused:
            raise ValueError(f"weight sync plan: the engines fill nothing from the trainer's {sorted(unused)[:5]}; "
                             "they would keep serving their initial values (a different model architecture?)")

    def join(self, address: GroupAddress) -> None:
        """Rank 0 joins the weight-sync group as the broadcast root (every engine worker joins at once)."""
        self.group = make_group(address, 0)
        warm_up(self.group, self.flat.device)

    def ipc_handle(self) -> bytes:
        """Colocated: the CUDA IPC handle of the flat buffer, handed out once; the buffer lives as long as we do."""
        return ipc_handle(self.flat)

    # ---- publish -----------------------------------------------------------------------
    def publish(self) -> SendReport | None:
        """Fill the flat buffer and broadcast it (rank 0 sends; other ranks take part in the gathers).
        Returns bytes moved and seconds on rank 0."""
        if self.rank == 0 and self.group is None:
            raise RuntimeError("publish before the weight-sync group was joined")
        return self._fill(send=True)

    def pack(self) -> SendReport | None:
        """Colocated: only fill the flat buffer (the engines copy out of it); returns bytes and seconds on rank 0."""
        return self._fill(send=False)

    def _fill(self, send: bool) -> SendReport | None:
        if self.plan is None:
            raise RuntimeError("publish before the weight-sync plan was set")
        t0 = time.perf_counter()
        if self.rank != 0:
            for _ in self.named_for_engine():  # the gathers need every rank
                pass
            return None
        works = []
        buckets = self.plan.buckets
        try:
            with torch.no_grad():
                if self.static is not None:
                    for k, (dsts, srcs) in enumerate(self._static_copies()):
                        if dsts:
                            torch._foreach_copy_(dsts, srcs)  # cast to the engine dtype, into place
                        if send:
                            works.append(self.group.broadcast(self.flat[buckets[k][0] : buckets[k][1]], 0))
                else:
                    works = self._fill_streamed(send)
                for w in works:
                    w.wait()  # NCCL: this stream waits; gloo: this thread does
        except Exception:
            # a receiver died or hung: close this end, so the other receivers fail now instead of
            # waiting out the timeout; the driver rebuilds the group
            self.group = None
            raise
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # filled (and sent): the engines may read it
        return SendReport(self.plan.nbytes, time.perf_counter() - t0)

    def _static_copies(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Per bucket: the (destination, source) views of the regions first needed by it. Built once;
        rebuilt only if a parameter's storage moved."""
        ptrs = [t.data_ptr() for t in self.static.values()]
        if self._static_views is not None and self._static_ptrs == ptrs:
            return self._static_views
        per_bucket: list[tuple[list, list]] = [([], []) for _ in self.plan.buckets]
        for name, targets in self._targets.items():
            src = self.static[name].detach()
            for j, dst, (dim, start, length) in targets:
                dsts, srcs = per_bucket[self._first_bucket[j]]
                dsts.append(dst)
                srcs.append(src if dim is None else src.narrow(dim, start, length))
        self._static_views, self._static_ptrs = per_bucket, ptrs
        return per_bucket

    def _fill_streamed(self, send: bool) -> list:
        """Copy each full tensor into its views as it arrives; send each bucket once all its regions are full."""
        plan, buckets = self.plan, self.plan.buckets
        pieces_left = [len(r.pieces) for r in plan.regions]
        regions_left = [0] * len(buckets)  # regions overlapping each bucket, not yet full
        for j in range(len(plan.regions)):
            for k in range(self._first_bucket[j], self._last_bucket[j] + 1):
                regions_left[k] += 1
        works, next_bucket, seen = [], 0, set()
        for name, t in self.named_for_engine():
            seen.add(name)
            for j, dst, (dim, start, length) in self._targets.get(name, ()):
                dst.copy_(t.detach() if dim is None else t.detach().narrow(dim, start, length))
                pieces_left[j] -= 1
                if pieces_left[j] == 0:
                    for k in range(self._first_bucket[j], self._last_bucket[j] + 1):
                        regions_left[k] -= 1
            while next_bucket < len(buckets) and regions_left[next_bucket] == 0:
                if send:
                    works.append(self.group.broadcast(self.flat[buckets[next_bucket][0] : buckets[next_bucket][1]], 0))
                next_bucket += 1
        if next_bucket < len(buckets):
            missing = sorted(set(self._targets) - seen)
            raise RuntimeError(f"weight sync: the trainer produced no {missing[:5]}, which the plan needs")
        return works
