"""The weight-sync regions (plan.py) of a live vLLM model, for one tensor-parallel worker.

Runs inside a vLLM worker process. For every parameter the worker holds, it says which trainer
(checkpoint-format) tensors fill it and where, following the rules of vLLM's own weight loaders
(vllm/model_executor/layers/linear.py and vocab_parallel_embedding.py, the same in vLLM 0.24 and
0.32), with TP rank r of T:

| engine layer | region (this rank's shard) | filled by |
| --- | --- | --- |
| `QKVParallelLinear` (`qkv_proj`) | rows [q; k; v] of this rank's heads | q rows r·q.., k and v rows (r // kv_replicas)·kv.. of `q_proj`, `k_proj`, `v_proj` (weight and bias) |
| `MergedColumnParallelLinear` (`gate_up_proj`) | rows [gate; up] | rows r·n.. of each of `gate_proj`, `up_proj` |
| `ColumnParallelLinear` | rows r·n.. | the same-named tensor |
| `RowParallelLinear` | columns r·n.. of the weight; the bias whole | the same-named tensor |
| `VocabParallelEmbedding`, `ParallelLMHead` | the rank's real vocabulary rows only; its padding rows stay 0 | rows [org_start, org_end) |
| anything else (norms, `ReplicatedLinear`) | the whole tensor | the same-named tensor |

The sub-tensor names of a fused layer come from the model's `packed_modules_mapping` (e.g.
`{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}`), the attribute vLLM's LoRA and quantisation code
read too. Tied embeddings need no rule: vLLM shares the parameter (`lm_head.weight` is
`model.embed_tokens.weight`) and `named_parameters()` lists it once, as the trainer does.

Shapes come from the layer's partition sizes, not from the parameter: on CPU vLLM replaces linear
weights by empty placeholders once it packed them for oneDNN.
"""

from __future__ import annotations

import torch

from weight_sync.plan import Piece, Region


def _dtype(model: torch.nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    raise ValueError("weight sync plan: the vLLM model has no floating-point parameter")


def regions_of(model: torch.nn.Module, tp_rank: int, quantized: bool = False) -> list[Region]:
    """The regions of the worker with tensor-parallel rank `tp_rank`, in the model's parameter order."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        LinearBase,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if quantized:
        raise ValueError("weight sync into a quantized vLLM model is not supported: its kernels read "
                         "repacked weights and scales a plain copy would not produce; serve the model unquantized")
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())  # a tied parameter comes once
    dtype = _dtype(model)
    regions = []
    for name, param in params.items():
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        prefix, _, leaf = module_name.rpartition(".")

        def sub(s: str) -> str:
            return f"{prefix}.{s}.{attr}" if prefix else f"{s}.{attr}"

        def linear(rows: int, pieces: list[Piece]) -> Region:
            cols = getattr(module, "input_size_per_partition", module.input_size)  # ReplicatedLinear: input_size
            shape = (rows, cols) if attr == "weight" else (rows,)
            return Region(name, tp_rank, shape, dtype, tuple(pieces))

        if isinstance(module, QKVParallelLinear):
            parts = packed.get(leaf, ["q_proj", "k_proj", "v_proj"])
            if len(parts) != 3:
                raise ValueError(f"weight sync plan: {module_name} is a QKVParallelLinear but the model maps it "
                                 f"to {parts}; three checkpoint tensors (q, k, v) expected")
            r = module.tp_rank
            kv = r // module.num_kv_head_replicas  # a kv head is shared by several ranks when T > kv heads
            q, k, v = (module.num_heads * module.head_size, module.num_kv_heads * module.head_size,
                       module.num_kv_heads * getattr(module, "v_head_size", module.head_size))
            regions.append(linear(q + k + v, [Piece(sub(parts[0]), 0, r * q, 0, q), Piece(sub(parts[1]), 0, kv * k, q, k),
                                              Piece(sub(parts[2]), 0, kv * v, q + k, v)]))
        elif isinstance(module, MergedColumnParallelLinear):
            parts = packed.get(leaf)
            if parts is None or len(parts) != len(module.output_sizes):
                raise ValueError(f"weight sync plan: {module_name} fuses {len(module.output_sizes)} outputs but the "
                                 f"model's packed_modules_mapping gives {parts} for {leaf!r}")
            pieces, rows = [], 0
            for part, size in zip(parts, module.output_sizes):
                n = size // module.tp_size
                pieces.append(Piece(sub(part), 0, module.tp_rank * n, rows, n))
                rows += n
            regions.append(linear(rows, pieces))
        elif isinstance(module, ColumnParallelLinear):
            n = module.output_size_per_partition
            regions.append(linear(n, [Piece(name, 0, module.tp_rank * n, 0, n)]))
        elif isinstance(module, RowParallelLinear) and attr == "weight":
            n = module.input_size_per_partition
            regions.append(Region(name, tp_rank, (module.output_size, n), dtype,
                                  (Piece(name, 1, module.tp_rank * n, 0, n),)))
        elif isinstance(module, VocabParallelEmbedding):
            if module.num_added_embeddings:
                raise ValueError(f"weight sync plan: {module_name} has {module.num_added_embeddings} added "
                                 "(LoRA) vocabulary rows, which the trainer does not hold")
            if attr != "weight":
                raise ValueError(f"weight sync plan: {name}: only the weight of a vocabulary-parallel layer is supported")
            idx = module.shard_indices
            n = idx.org_vocab_end_index - idx.org_vocab_start_index
            regions.append(Region(name, tp_rank, (n, module.embedding_dim), dtype,
                                  (Piece(name, 0, idx.org_vocab_start_index, 0, n),)))
        elif isinstance(module, ReplicatedLinear):
            regions.append(linear(sum(module.output_partition_sizes), [Piece(name, None)]))
        elif isinstance(module, LinearBase) and not isinstance(module, RowParallelLinear) and module.tp_size > 1:
            raise ValueError(f"weight sync plan: {name} belongs to a {type(module).__name__}, a tensor-parallel "
                             "layer this plan has no rule for")
        else:  # norms, a row-parallel bias: every rank holds the whole tensor
            regions.append(Region(name, tp_rank, tuple(param.shape), dtype, (Piece(name, None),)))
    for r in regions:
        live = params[r.param]
        if live.numel() and (tuple(live.shape[1:]) != r.shape[1:] or (r.shape and live.shape[0] < r.shape[0])):
            raise ValueError(f"weight sync plan: {r.param} has shape {list(live.shape)} but its layer's partition "
                             f"sizes give {list(r.shape)}")
    return regions
