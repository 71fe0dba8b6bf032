"""The critic of PPO with GAE (algorithm.advantage=gae; docs/design.md section 3b): a value model beside
the policy, trained on the same batches, Ray-free like the policy step.

    critic = CriticStep.build(cfg, model_dir)          # one process; the trainer actor builds it beside PolicyStep
    values = critic.values(trajs)                       # per-token V(s_t) of each trajectory, by the CURRENT critic
    advantages, returns = targets(trajs, values, cfg)   # GAE, whitened over the batch's model tokens
    metrics = critic.train_step(trajs, returns, values)

The value model is a causal LM with a scalar head read at every position that predicts a response
token (the state before the model wrote it): initialised from a reward model (critic.path, e.g. the
one scripts/train_rm.py made, as OpenRLHF and verl do) or, unset, from the policy's own weights with a
fresh head. Asynchronous-safe: values are computed by the critic as it is when the batch is trained
on, not by a stale one at rollout time (AReaL, verl's fully asynchronous trainer, OpenRLHF), so the
advantages of a stale batch are those of the current critic.

The loss, over the model-written tokens of a minibatch (token mean, every rank's, as the policy's):

    V_clip = V_old + clip(V - V_old, -c, c)                 c = critic.value_clip (V_old: the values above)
    L_V    = 0.5 * mean( max((V - R)^2, (V_clip - R)^2) )

with its own AdamW (critic.lr), the policy's minibatches and token-budget micro-batches, sharded with
FSDP2 like the policy. Metrics: critic/value_loss, critic/clipfrac (tokens where the clipped term is
the larger), critic/explained_variance (1 - Var(R - V_old) / Var(R), over the batch's model tokens),
critic/value_mean, time/critic_s.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch

from rewards.reward_model import decoder_and_head, load_reward_model
from rollout.trajectory import Trajectory
from trainer import parallel
from trainer.gae import gae
from trainer.minibatch import split_minibatches
from trainer.model import adamw, eval_mode, synced_time
from trainer.packing import PackedBatch, pack, pad, plan_micro_batches, use_packed_attention


def value_loss(v: torch.Tensor, v_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
               denominator: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss summed over the valid tokens of a micro-batch / `denominator` (the minibatch's token
    count over every micro-batch and rank), and the clipped tokens: where the clipped term is the larger."""
    outside = (v - v_old).abs() > clip
    v_clip = torch.where(outside, v_old + (v - v_old).clamp(-clip, clip), v)  # exactly V inside: no rounding
    unclipped, clipped = (v - returns) ** 2, (v_clip - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped, clipped)
    valid = mask > 0
    loss = torch.where(valid, per_token, torch.zeros_like(per_token)).sum() / denominator
    return loss, ((clipped > unclipped) & valid).sum()


def targets(trajs: list[Trajectory], values: list[list[float]], cfg) -> tuple[list[list[float]], list[list[float]]]:
    """GAE advantages (whitened: mean 0, std 1 over the batch's model tokens, as verl and OpenRLHF do) and
    returns (not whitened: the critic's targets) of each trajectory."""
    alg = cfg.algorithm
    pairs = [gae(v, t.loss_weights(), t.reward, alg.gamma, alg.lam) for t, v in zip(trajs, values)]
    flat = [a for (adv, _), t in zip(pairs, trajs) for a, m in zip(adv, t.loss_weights()) if m > 0]
    mean = sum(flat) / max(len(flat), 1)
    std = math.sqrt(sum((a - mean) ** 2 for a in flat) / max(len(flat) - 1, 1))
    advantages = [[(a - mean) / (std + 1e-8) if m > 0 else 0.0 for a, m in zip(adv, t.loss_weights())]
                  for (adv, _), t in zip(pairs, trajs)]
    return advantages, [ret for _, ret in pairs]


class CriticStep:
    def __init__(self, cfg, model: torch.nn.Module, device: torch.device, rank: int = 0, world_size: int = 1,
                 fsdp: bool = False, mixed_precision: bool = False) -> None:
        self.cfg, self.model, self.device = cfg, model, device
        self.rank, self.world_size, self.fsdp = rank, world_size, fsdp
        self.packed = cfg.trainer.pack_sequences
        if fsdp:
            parallel.shard(model, getattr(torch, cfg.model.dtype) if mixed_precision else None)
        self.autocast_dtype = getattr(torch, cfg.model.dtype) if mixed_precision and not fsdp else None
        self.optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=cfg.critic.lr,
                               weight_decay=cfg.trainer.weight_decay)
        self.steps = 0

    @staticmethod
    def load_model(cfg, model_dir: str, device: torch.device) -> torch.nn.Module:
        """The value model: critic.path (a reward model) or the policy's weights with a fresh scalar head."""
        model = load_reward_model(cfg.critic.path or model_dir, device, torch.float32)
        model.config.use_cache = False
        if cfg.trainer.pack_sequences:
            use_packed_attention(model)
        return model.train()

    @classmethod
    def build(cls, cfg, model_dir: str, device: torch.device | None = None) -> CriticStep:
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(cfg, cls.load_model(cfg, model_dir, device), device)

    def _forward(self, batch) -> torch.Tensor:
        """V at every response position: (1, R) packed, (B, T) padded."""
        decoder, head = decoder_and_head(self.model)
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with autocast:
            if isinstance(batch, PackedBatch):
                kwargs = batch.forward_kwargs()
                hidden = decoder(**kwargs).last_hidden_state  # (1, T, H)
                return head(hidden[0, batch.predict_at]).squeeze(-1).float()[None]  # (1, R)
            T = batch.targets.shape[1]
            hidden = decoder(input_ids=batch.ids, attention_mask=batch.attn, position_ids=batch.positions,
                             use_cache=False).last_hidden_state  # (B, P + T, H)
            return head(hidden[:, -T - 1 : -1]).squeeze(-1).float()  # (B, T): the outputs predicting response tokens

    def _tensors(self, trajs: list[Trajectory], per_token: list[list[float]]):
        return pack(trajs, per_token, self.device) if self.packed else pad(trajs, per_token, self.device)

    def _plan(self, trajs: list[Trajectory]) -> list[tuple[list[int], list[list[int] | None]]]:
        """Per minibatch (the policy's split): its trajectories, and this rank's micro-batches of them."""
        lengths = [t.num_tokens for t in trajs]
        budget = self.cfg.trainer.max_tokens_per_micro_batch
        return [(part, plan_micro_batches(lengths, part, self.world_size, self.rank, budget))
                for part in split_minibatches(len(trajs), self.cfg.trainer.num_minibatches)]

    @torch.no_grad()
    def values(self, trajs: list[Trajectory]) -> list[list[float]]:
        """Each trajectory's V per response token under the current critic (every rank computes them all)."""
        out: list[list[float]] = [[] for _ in trajs]
        budget = self.cfg.trainer.max_tokens_per_micro_batch
        lengths = [t.num_tokens for t in trajs]
        with eval_mode(self.model):
            for mb in plan_micro_batches(lengths, list(range(len(trajs))), 1, 0, budget):
                batch = self._tensors([trajs[i] for i in mb], [[0.0] * len(trajs[i].response_ids) for i in mb])
                v = self._forward(batch)
                flat = v.reshape(-1).tolist() if self.packed else None
                start = 0
                for row, i in enumerate(mb):
                    n = len(trajs[i].response_ids)
                    out[i] = flat[start : start + n] if self.packed else v[row, :n].tolist()
                    start += n
        return out

    def train_step(self, trajs: list[Trajectory], returns: list[list[float]], old: list[list[float]]) -> dict:
        """One pass of value updates over the policy's minibatches (x trainer.ppo_epochs)."""
        t0 = time.perf_counter()
        c = self.cfg.critic.value_clip
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, clipped tokens, tokens
        updates = 0
        for _ in range(self.cfg.trainer.ppo_epochs):
            for part, plan in self._plan(trajs):
                denominator = float(sum(trajs[i].num_trained_tokens for i in part))  # every rank has the whole batch
                if denominator == 0:
                    continue
                self.optimizer.zero_grad(set_to_none=False)
                for mb in plan:
                    idx = mb or [0]
                    ret = self._tensors([trajs[i] for i in idx], [returns[i] for i in idx])
                    v_old = self._tensors([trajs[i] for i in idx], [old[i] for i in idx]).advantages
                    mask = ret.mask * (0.0 if mb is None else 1.0)  # a stand-in micro-batch contributes nothing
                    loss, clipped = value_loss(self._forward(ret), v_old, ret.advantages, mask, c, denominator)
                    (loss * self.world_size if self.fsdp else loss).backward()
                    sums += torch.stack([loss.detach().double(), clipped.double(), (mask > 0).sum().double()])
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
                self.optimizer.step()
                updates += 1
        t_end = synced_time(self.device)
        loss, clipped, tokens = parallel.all_reduce_sum(sums, self.device)
        flat_r = [r for t, rets in zip(trajs, returns) for r, m in zip(rets, t.loss_weights()) if m > 0]
        flat_v = [v for t, vals in zip(trajs, old) for v, m in zip(vals, t.loss_weights()) if m > 0]
        self.steps += 1
        return {"critic/value_loss": loss / max(updates, 1), "critic/clipfrac": clipped / max(tokens, 1),
                "critic/explained_variance": _explained_variance(flat_r, flat_v),
                "critic/value_mean": sum(flat_v) / max(len(flat_v), 1), "critic/updates": updates,
                "time/critic_s": t_end - t0}


def _explained_variance(returns: list[float], values: list[float]) -> float:
    """1 - Var(R - V) / Var(R): 1 = the values predict the returns, 0 = no better than their mean."""
    if len(returns) < 2:
        return 0.0
    mean_r = sum(returns) / len(returns)
    var_r = sum((r - mean_r) ** 2 for r in returns)
    diff = [r - v for r, v in zip(returns, values)]
    mean_d = sum(diff) / len(diff)
    var_d = sum((d - mean_d) ** 2 for d in diff)
    return 1.0 - var_d / var_r if var_r > 0 else 0.0
