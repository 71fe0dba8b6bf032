"""The policy's state outside a step: its full weights (for the engines and the export), checkpoints,
and the Hugging Face export (docs/design.md section 10).

    for name, tensor in full_weights(step): ...     # every rank iterates (FSDP gathers); LoRA merged
    save(step, checkpoint_dir)                       # trainer.pt, rank 0 writes
    step_number = load(step, checkpoint_dir)         # every rank reads
    save_critic(critic, rank, checkpoint_dir); load_critic(critic, checkpoint_dir)   # critic.pt (algorithm.advantage=gae)
    export_hf(step, out_dir, model_dir)              # merged weights in model.dtype, tokenizer, config

Every function takes part in collectives under FSDP: call it on every rank.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trainer import lora, parallel
from trainer.parallel import full
from trainer.step import PolicyStep


def full_weights(step: PolicyStep) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor) of every weight the engines serve, under the base model's names: with
    LoRA the adapters are folded into their layers. Every rank must iterate it (gathers)."""
    named = ((n, full(p).detach()) for n, p in step.model.named_parameters())
    return lora.merge(named, step.lora_scale) if step.lora_scale is not None else named


def rank0_only(rank: int, named: Iterable):
    """`named` on rank 0; elsewhere it is iterated (the gathers need every rank) and nothing kept."""
    if rank == 0:
        return named
    for _ in named:
        pass
    return iter(())


def save(step: PolicyStep, path: str) -> None:
    """Write trainer.pt into the checkpoint directory `path` (rank 0; every rank gathers): full trained
    weights (LoRA: the adapters only), optimizer, scheduler, EWMA, advantage statistics, step and RNG
    states. Tensors and plain containers only: it loads with torch.load(weights_only=True)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(step.model, step.optimizer, options=opts)
    ewma = None
    if step.ewma is not None:
        gathered = (full(_as_param_layout(a, p)) for a, p in zip(step.ewma.averaged(), step.trained))
        ewma = [t.cpu() for t in rank0_only(step.rank, gathered)]
    if step.rank != 0:
        return
    if step.lora_scale is not None:
        model_sd = {k: v for k, v in model_sd.items() if lora.is_adapter(k)}
    state = {
        "model": model_sd, "optimizer": optim_sd, "scheduler": step.scheduler.state_dict(), "steps": step.steps,
        "ewma": None if ewma is None else {"avg": ewma, "num_updates": step.ewma.num_updates, "beta": step.ewma.beta},
        "adv_norm": step.adv_norm.state_dict() if step.adv_norm is not None else None,
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if step.device.type == "cuda" else None},
        "skipped_in_a_row": step.skipped_in_a_row,
    }
    torch.save(state, Path(path) / "trainer.pt")


def save_critic(critic, rank: int, path: str) -> None:
    """critic.pt beside trainer.pt: the value model and its optimizer (rank 0 writes; every rank gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(critic.model, critic.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": model_sd, "optimizer": optim_sd, "steps": critic.steps}, Path(path) / "critic.pt")


def load_critic(critic, path: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    file = Path(path) / "critic.pt"
    if not file.exists():
        raise ValueError(f"checkpoint {path} has no critic.pt: it was written without algorithm.advantage=gae; "
                         "resume with the same setting")
    state = torch.load(file, map_location="cpu", weights_only=True)
    set_state_dict(critic.model, critic.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    critic.steps = int(state["steps"])


def _as_param_layout(avg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """An EWMA shard as a tensor laid out like its parameter (a DTensor under FSDP)."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        return DTensor.from_local(avg, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return avg


def load(step: PolicyStep, path: str) -> int:
    """Restore from a checkpoint directory written by `save`; every rank reads the file. Returns the
    step the checkpoint was taken after."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=True)
    strict = step.lora_scale is None  # LoRA checkpoints hold the adapters only
    set_state_dict(step.model, step.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=strict))
    step.scheduler.load_state_dict(state["scheduler"])
    if (state["ewma"] is None) != (step.ewma is None):
        raise ValueError(f"checkpoint {path} was written with algorithm.proximal "
                         f"{'ewma' if state['ewma'] else 'other than ewma'}; resume with the same setting")
    if step.ewma is not None:
        step.ewma.beta, step.ewma.num_updates = float(state["ewma"]["beta"]), int(state["ewma"]["num_updates"])
        with torch.no_grad():
            for avg, whole, p in zip(step.ewma.averaged(), state["ewma"]["avg"], step.trained):
                avg.copy_(parallel.shard_of(whole, p))
    if step.adv_norm is not None and state["adv_norm"] is not None:
        step.adv_norm.load_state_dict(state["adv_norm"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] is not None and step.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    step.steps = int(state["steps"])
    step.skipped_in_a_row = int(state["skipped_in_a_row"])
    return step.steps


def export_hf(step: PolicyStep, out_dir: str, model_dir: str) -> None:
    """The policy as a Hugging Face directory (merged weights in model.dtype, tokenizer, config), plus
    `<out_dir>/adapter` (PEFT format) with LoRA. Rank 0 writes; every rank gathers."""
    dtype = getattr(torch, step.cfg.model.dtype)
    merged = {n: t.to(dtype).cpu() for n, t in rank0_only(step.rank, full_weights(step))}
    adapters = ((n, full(p).detach()) for n, p in step.model.named_parameters() if lora.is_adapter(n))
    adapter = {n: t.cpu() for n, t in rank0_only(step.rank, adapters)}
    if step.rank != 0:
        return
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skeleton.save_pretrained(tmp, state_dict=merged)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    if step.lora_scale is not None:
        step.model.save_pretrained(tmp / "adapter", state_dict=adapter)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
