"""Helpers the tests share: a policy step of the tiny model, its gradient, batches, metrics rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rollout.trajectory import Trajectory
from tests.conftest import compose


def policy_step(tiny_model_dir: str, tmp_path, *overrides: str):
    """A PolicyStep of the tiny model on CPU, one process, with these Hydra overrides (after model=tiny
    and output_dir)."""
    from trainer.step import PolicyStep

    cfg = compose(["model=tiny", f"output_dir={tmp_path}", *overrides], cluster_gpus=0)
    return PolicyStep.build(cfg, tiny_model_dir)


def flat_grad(step) -> torch.Tensor:
    """Every parameter's gradient, concatenated (a copy)."""
    return torch.cat([p.grad.flatten().clone() for p in step.model.parameters()])


def gradient_of_step(step, batch: list[Trajectory]) -> tuple[torch.Tensor, dict]:
    """The gradient one training step computes (the optimizer's step turned off: Adam's m / sqrt(v) would
    turn float noise in near-zero gradients into sign flips), and its metrics."""
    step.optimizer.step = lambda: None
    step.optimizer.zero_grad(set_to_none=False)
    metrics = step.train_step(batch)
    return flat_grad(step), metrics


def on_policy(step, trajs: list[Trajectory]) -> list[Trajectory]:
    """Behaviour log-probs = the step's own at its current weights (w = 1)."""
    from trainer.packing import per_trajectory

    tb = step.tensors(trajs)
    with torch.no_grad():
        per_token = per_trajectory(step.logprobs(tb)[0], trajs, tb)
    for t, values in zip(trajs, per_token):
        t.logp_behav = values
    return trajs


def sequence_logprobs(step, trajs: list[Trajectory]) -> torch.Tensor:
    """(B,) summed log-prob of each response under the step's policy."""
    from trainer.packing import per_trajectory

    tb = step.tensors(trajs)
    with torch.no_grad():
        per_token = per_trajectory(step.logprobs(tb)[0], trajs, tb)
    return torch.tensor([sum(v) for v in per_token])


def long_tail_batch(seed: int = 11) -> list[Trajectory]:
    """Two groups of three with long-tail response lengths (1 to 40 tokens) and different prompts; the first
    response of group 0 and the second of group 1 rewarded (every dr_grpo advantage non-zero)."""
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for group, lengths in enumerate(([1, 7, 40], [3, 25, 2])):
        prompt = torch.randint(5, 500, (4 + 5 * group,), generator=g).tolist()
        for k, n in enumerate(lengths):
            resp = torch.randint(5, 500, (n,), generator=g).tolist()
            behav = (-9.0 - torch.rand(n, generator=g)).tolist()
            trajs.append(Trajectory(f"{group}-{k}", group, str(group), prompt, resp, behav, [0] * n, 0,
                                    reward=float(k == group)))
    return trajs


def ticket_group(ticket: dict, n: int) -> list[Trajectory]:
    """n one-token trajectories of an admitted group (the staleness service's ticket)."""
    return [Trajectory(f"{ticket['seq']}-{k}", ticket["prompt_index"], str(ticket["seq"]), [1], [2], [0.0], [0],
                       ticket["version"]) for k in range(n)]


def metric_rows(output_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none if it was not written)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def named_grads(model) -> dict[str, torch.Tensor]:
    """name -> full gradient (gathered from FSDP shards: a collective, every rank must call it)."""
    from trainer.parallel import full

    return {n: full(p.grad).detach().clone() for n, p in model.named_parameters()}


def formula_gradient(model_dir: str, trajs: list[Trajectory], advantages: list[float], agg_mode: str,
                     temperature: float) -> dict[str, torch.Tensor]:
    """The policy gradient at u = w = 1 (one update, on-policy), written from the formula with a fresh model
    and one plain forward pass per trajectory:
        token-mean:          L = -(1 / sum_i T_i) sum_i sum_t A_i logp_it
        seq-mean-token-mean: L = -(1 / N) sum_i (1 / T_i) sum_t A_i logp_it
    over the N trajectories of the batch, T_i response tokens each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    total_tokens = sum(len(t.response_ids) for t in trajs)
    loss = torch.zeros(())
    for t, a in zip(trajs, advantages):
        p, n = len(t.prompt_ids), len(t.response_ids)
        logits = model(torch.tensor([t.prompt_ids + t.response_ids])).logits[0, p - 1 : p + n - 1] / temperature
        logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(t.response_ids)[:, None]).squeeze(-1)
        weight = 1.0 / total_tokens if agg_mode == "token-mean" else 1.0 / (n * len(trajs))
        loss = loss - a * weight * logp.sum()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def fsdp_gradients(rank: int, world_size: int, port: int, model_dir: str, out_dir: str, runs: list[tuple[str, list[str]]],
                   batch: list[Trajectory]) -> None:
    """One rank of a real torch.distributed (gloo) group of `world_size` CPU processes: for each
    (name, overrides) of `runs`, a PolicyStep sharded with FSDP2 takes one step on `batch` with the
    optimizer's step turned off; rank 0 saves the full gradient to out_dir/<name>.pt.
    Started with torch.multiprocessing.spawn."""
    from trainer import parallel
    from trainer.model import load_causal_lm
    from trainer.step import PolicyStep

    parallel.init_trainer_group("127.0.0.1", port, rank, world_size, "gloo", 120)
    for name, overrides in runs:
        cfg = compose(["model=tiny", f"output_dir={out_dir}", f"trainer.num_workers={world_size}", *overrides],
                      cluster_gpus=0)
        model, scale = load_causal_lm(cfg, model_dir, torch.device("cpu"))
        step = PolicyStep(cfg, model, scale, torch.device("cpu"), rank, world_size, fsdp=True)
        step.optimizer.step = lambda: None
        step.train_step([Trajectory(**t.__dict__) for t in batch])
        grads = named_grads(step.model)
        if rank == 0:
            torch.save(grads, Path(out_dir) / f"{name}.pt")
    torch.distributed.destroy_process_group()
