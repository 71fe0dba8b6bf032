"""LoRA adapters through PEFT, and the merged weights the engines and the export receive.

    model = add_lora(model, lora_cfg)       # PEFT LoraConfig; only the adapters stay trainable
    base_name(peft_name) -> str              # "base_model.model.x.q_proj.base_layer.weight" -> "x.q_proj.weight"
    merge(named_full_tensors, scalings)      # W + scaling * B @ A for every adapted linear layer

The merge is computed from gathered tensors, outside the model, so the base weights are never
touched (PEFT's merge/unmerge in place would leave rounding error in them).
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import torch

_PREFIX = "base_model.model."


def add_lora(model: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                        bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules={list(target_modules)!r}: {e}") from None
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
            raise ValueError(f"model.lora.target_modules matches {name} ({type(module).__name__}); only linear "
                             "layers can be adapted here: list linear projections such as q_proj, v_proj")
    return model


def scalings(model: torch.nn.Module) -> dict[str, float]:
    """Base-model module name -> LoRA scaling (alpha / r) of every adapted layer."""
    from peft.tuners.lora import LoraLayer

    return {base_name(name + ".weight").removesuffix(".weight"): float(m.scaling["default"])
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def base_name(name: str) -> str:
    return name.removeprefix(_PREFIX).replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merge(named: Iterable[tuple[str, torch.Tensor]], scale: dict[str, float]) -> Iterator[tuple[str, torch.Tensor]]:
    """(base name, merged tensor) for every base parameter, in the base model's order; adapters are
    folded into their layer.

    `named` yields the PEFT model's parameters (full tensors) in module order: a layer's base weight
    (and bias) come before its lora_A and lora_B, so the weight is held until both arrived, and what
    follows it waits too, keeping the order the receivers were told (`param_metas`)."""
    order: deque[str] = deque()  # base names, in the model's order, not yet yielded
    ready: dict[str, torch.Tensor] = {}
    held: dict[str, torch.Tensor] = {}  # module -> base weight waiting for its adapter
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named:
        if is_adapter(name):
            module = base_name(name.split(".lora_")[0] + ".weight").removesuffix(".weight")
            parts.setdefault(module, {})["A" if ".lora_A." in name else "B"] = t
            if len(parts[module]) == 2:
                ab, w = parts.pop(module), held.pop(module)
                ready[module + ".weight"] = w + scale[module] * (ab["B"].to(w.dtype) @ ab["A"].to(w.dtype))  # (out, in)
        else:
            bname = base_name(name)
            order.append(bname)
            module = bname.removesuffix(".weight")
            if bname.endswith(".weight") and module in scale:
                held[module] = t
            else:
                ready[bname] = t
        while order and order[0] in ready:
            yield order[0], ready.pop(order.popleft())
    if order:
        raise RuntimeError(f"LoRA merge: adapters missing for {sorted(held)}")
