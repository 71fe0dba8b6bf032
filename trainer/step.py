"""The policy step: one batch of trajectories in, K optimizer updates of the policy out (docs/design.md
section 3). Plain Python and torch, no Ray: the trainer actor (trainer/worker.py) holds one of these.

    step = PolicyStep.build(cfg, model_dir)           # one process, no FSDP (tests, one CPU trainer)
    metrics = step.train_step(trajectories)

One `train_step` makes K = trainer.num_minibatches x trainer.ppo_epochs optimizer updates:
1. advantages from the rewards of each group (GRPO, Dr. GRPO, RLOO, or ReMax's greedy baseline),
   optionally normalised by EWMA statistics (batch-size invariance, docs/design.md section 4);
2. the batch is split into minibatches and each into this rank's micro-batches (packed rows by a
   token budget, or padded), every micro-batch loss divided by the number of valid tokens (or
   sequences) in the whole minibatch over every rank, so neither the split nor the ranks change
   the gradient;
3. pi_prox log-probs, once for the whole step, before the first update: recomputed under the
   weights at the start of the step (AReaL), or under the bias-corrected EWMA of the weights
   (PPO-EWMA, Hilton et al. arXiv 2110.00641), or pi_behav itself for coupled PPO;
4. per minibatch: forward/backward per micro-batch, clip, step. The second and later updates see
   u = pi_theta / pi_prox != 1, so the clip acts (with K = 1 and recompute, u = 1 and it never does);
5. diagnostics aggregated over every update (mean and max), among them how far the engine's policy
   is from pi_prox (the gap the decoupled objective corrects); the policy version advances once.

Every pass that is not the gradient pass (pi_prox, the KL reference) runs with dropout off, and with
trainer.disable_dropout (the default, as TRL) the gradient pass too.

With several trainer ranks the model is sharded with FSDP2 (trainer/parallel.py): every rank gets
the whole batch, computes the same advantages and trains on its share of the micro-batches.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout.trajectory import Trajectory
from trainer import parallel
from trainer.advantages import EWMANormalizer, group_advantages
from trainer.invariance import EWMAParams, effective_hparams
from trainer.losses import aggregate, kl_penalty, policy_loss
from trainer.minibatch import UpdateStats, split_minibatches
from trainer.model import adamw, eval_mode, load_causal_lm, max_memory_gib, swapped, synced_time, token_logprobs_of
from trainer.packing import PackedBatch, PaddedBatch, pack, pad, plan_micro_batches
from trainer.parallel import full, local

log = logging.getLogger(__name__)

Batch = PackedBatch | PaddedBatch


@dataclass
class Minibatch:
    """One optimizer update's data on this rank: its micro-batches (trajectory indices, or None for a
    stand-in run at weight 0 on a rank short of work), their tensors, and the minibatch's global
    loss denominator (valid tokens, or sequences, over every rank)."""

    members: list[list[int] | None]
    tensors: list[Batch]
    denominator: float


class PolicyStep:
    """The policy model, its optimizer and scheduler, the PPO-EWMA weights, the KL reference and the
    advantage statistics: everything one training step reads and writes."""

    def __init__(self, cfg, model: torch.nn.Module, lora_scale: dict[str, float] | None, device: torch.device,
                 rank: int = 0, world_size: int = 1, fsdp: bool = False, mixed_precision: bool = False) -> None:
        alg = cfg.algorithm
        self.cfg, self.model, self.lora_scale, self.device = cfg, model, lora_scale, device
        self.rank, self.world_size, self.fsdp = rank, world_size, fsdp
        compute_dtype = getattr(torch, cfg.model.dtype) if mixed_precision else None
        # GPU without FSDP (trainer.fsdp=false): per-op autocast to model.dtype over the fp32 master weights
        self.autocast_dtype = compute_dtype if not fsdp else None
        self.packed = cfg.trainer.pack_sequences
        self.hparams = effective_hparams(cfg)  # batch-size invariance derives these from the reference
        span = self.hparams["adv_norm_span"]
        self.adv_norm = EWMANormalizer(span) if span else None
        self.steps = 0
        self.skipped_in_a_row = 0
        # KL to the frozen initial policy: with LoRA the base model with the adapters switched off,
        # otherwise a second copy of the model, forward only (sharded like the policy)
        self.ref_model = None
        if alg.kl_coef > 0 and lora_scale is None:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            if fsdp:
                parallel.shard(self.ref_model, compute_dtype)
        if fsdp:
            parallel.shard(model, compute_dtype)
        self.trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.optimizer = adamw(self.trained, lr=self.hparams["lr"], betas=self.hparams["adam_betas"],
                               weight_decay=cfg.trainer.weight_decay)
        warmup = cfg.trainer.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        # PPO-EWMA: one extra copy of the trained parameters (this rank's shards), updated after every update
        self.ewma = None
        if alg.loss == "decoupled_ppo" and alg.proximal == "ewma":
            self.ewma = EWMAParams([local(p) for p in self.trained], self.hparams["ewma_decay"], dtype=torch.float32)
            self.ewma.update(local(p) for p in self.trained)

    @classmethod
    def build(cls, cfg, model_dir: str, device: torch.device | None = None) -> PolicyStep:
        """One process, no process group: load the model and build the step around it."""
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, scale = load_causal_lm(cfg, model_dir, device)
        return cls(cfg, model, scale, device)

    # ---- the passes ---------------------------------------------------------------------
    def tensors(self, trajs: list[Trajectory], advantages: torch.Tensor | list[list[float]] | None = None) -> Batch:
        """One micro-batch on the device: packed into one row (trainer.pack_sequences), or padded. `advantages`:
        (N,) per trajectory, or per-token lists."""
        adv = torch.zeros(len(trajs)) if advantages is None else advantages
        return pack(trajs, adv, self.device) if self.packed else pad(trajs, adv, self.device)

    def logprobs(self, batch: Batch, with_entropy: bool = False, model: torch.nn.Module | None = None):
        """Log-probs (and entropy, or None) of the response tokens under `model` (default: the policy)."""
        return token_logprobs_of(model or self.model, batch, self.cfg.rollout.temperature, self.autocast_dtype,
                                 with_entropy)

    @torch.no_grad()
    def proximal_logprobs(self, tensors: list[Batch]) -> list[torch.Tensor]:
        """pi_prox of each micro-batch: pi_behav (coupled PPO), or the policy at the step's start (recompute),
        or the EWMA of its weights."""
        if self.cfg.algorithm.loss == "ppo":
            return [tb.behav for tb in tensors]  # coupled PPO: pi_prox = pi_behav
        with eval_mode(self.model):
            if self.ewma is None:
                return [self.logprobs(tb)[0] for tb in tensors]
            with swapped([local(p) for p in self.trained], self.ewma.averaged()):
                return [self.logprobs(tb)[0] for tb in tensors]

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        if self.ref_model is not None:
            return self.logprobs(batch, model=self.ref_model)[0]  # kept in eval mode
        with eval_mode(self.model), self.model.disable_adapter():  # LoRA: the frozen base model is the reference
            return self.logprobs(batch)[0]

    def advantages(self, trajs: list[Trajectory], baselines: list[Trajectory]):
        """(N,) advantages, and the advantage normaliser with this batch in its statistics (or None)."""
        alg = self.cfg.algorithm
        group_ids = {g: i for i, g in enumerate(dict.fromkeys(t.group_id for t in trajs))}
        rewards = torch.tensor([t.reward for t in trajs])  # (N,)
        index = torch.tensor([group_ids[t.group_id] for t in trajs])  # (N,)
        baseline = None
        if alg.advantage == "remax":
            by_group = {b.group_id: b.reward for b in baselines}
            missing = [g for g in group_ids if g not in by_group]
            if missing:
                raise RuntimeError(f"ReMax: groups {missing[:5]} arrived without their greedy baseline response")
            baseline = torch.tensor([by_group[g] for g in group_ids])  # (G,) in group-index order
        adv = group_advantages(rewards, index, alg.advantage, baseline)
        pending = None
        if self.adv_norm is not None:
            # statistics with this batch in them; kept only if the step is taken (a skipped step must not move them)
            pending = self.adv_norm.updated(adv)
            adv = pending.normalize(adv)
        return adv, pending

    def micro_batches(self, trajs: list[Trajectory], active: list[int]) -> list[list[int] | None]:
        """This rank's micro-batches of the active trajectories. Every rank runs the same number of
        forward/backward passes (FSDP gathers in each); a rank short of work gets None entries, run on
        a stand-in trajectory with its loss multiplied by 0. Packed: by the token budget, balanced
        across ranks (trainer/packing.py); padded: trainer.micro_batch_size trajectories each."""
        tc = self.cfg.trainer
        if self.packed:
            lengths = [t.num_tokens for t in trajs]
            return plan_micro_batches(lengths, active, self.world_size, self.rank, tc.max_tokens_per_micro_batch)
        mine = active[self.rank :: self.world_size]
        size = tc.micro_batch_size
        n = math.ceil(math.ceil(len(active) / self.world_size) / size)
        mbs: list[list[int] | None] = [mine[i : i + size] for i in range(0, len(mine), size)]
        return mbs + [None] * (n - len(mbs))

    # ---- the step -----------------------------------------------------------------------
    def train_step(self, batch: list[Trajectory], advantages: list[list[float]] | None = None, update: bool = True) -> dict:
        """One training step; with the step in trainer.profile_steps, under torch.profiler (trace and table in
        output_dir/profile/). `advantages`: per-token advantages of the trajectories trained on (a critic's
        GAE, in batch order without ReMax baselines) instead of the group advantages; `update=False` makes
        no optimizer update (a critic's warm-up: the step's metrics, the same weights)."""
        if self.steps + 1 not in self.cfg.trainer.profile_steps:
            return self._train_step(batch, advantages, update)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=False) as prof:
            metrics = self._train_step(batch, advantages, update)
        out = Path(self.cfg.output_dir) / "profile"
        out.mkdir(parents=True, exist_ok=True)
        name = f"trainer_step_{self.steps:04d}_rank{self.rank}"
        prof.export_chrome_trace(str(out / f"{name}.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (out / f"{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
        return metrics

    def _train_step(self, batch: list[Trajectory], given: list[list[float]] | None, update: bool) -> dict:
        t0 = time.perf_counter()
        alg, tc = self.cfg.algorithm, self.cfg.trainer
        trajs = [t for t in batch if not t.is_baseline]
        if given is None:
            advantages, pending_norm = self.advantages(trajs, [t for t in batch if t.is_baseline])
        else:
            advantages, pending_norm = given, None
        minibatches, active = self._minibatches(trajs, advantages)
        t_batch = synced_time(self.device)
        # pi_prox is fixed for the whole step: computed once, before the first update. With one update and
        # recompute it is the policy at that update, so the gradient pass's own log-probs serve (detached)
        # and the extra forward pass is saved.
        single = tc.num_minibatches * tc.ppo_epochs == 1 and alg.loss == "decoupled_ppo" and self.ewma is None
        prox = [None if single else self.proximal_logprobs(mb.tensors) for mb in minibatches]
        t_prox = synced_time(self.device)

        stats = UpdateStats()
        for _ in range(tc.ppo_epochs if update else 0):
            for mb, prox_mb in zip(minibatches, prox):
                if mb.denominator > 0:  # a minibatch with nothing to train on (all truncated and masked) makes no update
                    stats.add(*self.update(mb, prox_mb))
        t_update = synced_time(self.device)

        skipped = stats.skipped > 0
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if skipped:
            log.warning("Non-finite loss or gradient at step %d in %d of %d updates; skipping those optimizer "
                        "updates (%d steps in a row).", self.steps + 1, stats.skipped, stats.updates, self.skipped_in_a_row)
        if pending_norm is not None and stats.applied > 0:
            self.adv_norm = pending_norm
        self.scheduler.step()  # the learning-rate schedule counts training steps, not updates
        self.steps += 1
        n = max(len(trajs), 1)
        rewards = torch.tensor([t.reward for t in trajs])  # (N,)
        return {
            **stats.metrics(alg.kl_coef),
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "reward/overlong_penalty_mean": sum(t.info.get("overlong_penalty", 0.0) for t in trajs) / n,
            "rollout/response_len_mean": sum(len(t.response_ids) for t in trajs) / n,
            "rollout/truncated_frac": sum(t.finish_reason == "length" for t in trajs) / n,
            "train/skipped_steps": int(skipped),
            "train/skipped_in_a_row": self.skipped_in_a_row,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/active_frac": len(active) / n,  # trajectories trained on (non-zero advantage)
            "policy/ewma_center_of_mass_steps": self.hparams["ewma_center_of_mass_steps"] if self.ewma else 0.0,
            "train/tokens": sum(t.num_tokens for t in trajs),
            **_layout_stats(minibatches),
            "time/train_s": time.perf_counter() - t0,
            # where the step's time went: building and moving the micro-batches, the pi_prox pass, the updates
            "time/train_batch_s": t_batch - t0, "time/train_prox_s": t_prox - t_batch, "time/train_update_s": t_update - t_prox,
            "memory/max_allocated_gib": max_memory_gib(self.device),
        }

    def _minibatches(self, trajs: list[Trajectory], advantages) -> tuple[list[Minibatch], set[int]]:
        """The step's minibatches on this rank, and the trajectories trained on at all.

        algorithm.mask_truncated: a response cut at rollout.max_new_tokens gets no loss (it stays in its
        group's baseline and in the metrics) and leaves the loss denominator. A trajectory with advantage
        0 adds exactly 0 to the policy-gradient loss and its gradient (L = -w * min(u*0, clip(u)*0)), so
        it is left out of the forward/backward passes while its tokens still count in the denominator:
        the same gradient for less compute (a sparse reward makes most groups all-0 or all-1). A KL term
        has a gradient on every token, so with kl_coef > 0 every trajectory is trained on."""
        alg = self.cfg.algorithm
        trained = [not (alg.mask_truncated and t.finish_reason == "length") for t in trajs]
        if isinstance(advantages, torch.Tensor):
            nonzero = [bool(a != 0) for a in advantages]

            def select(idx: list[int]):
                return advantages[idx]
        else:  # per-token advantages (GAE)
            nonzero = [any(a != 0 for a in adv) for adv in advantages]

            def select(idx: list[int]):
                return [advantages[i] for i in idx]
        active = {i for i in range(len(trajs)) if trained[i] and (nonzero[i] or alg.kl_coef > 0)}
        out = []
        for part in split_minibatches(len(trajs), self.cfg.trainer.num_minibatches):
            kept = [i for i in part if trained[i]]
            n_tokens = sum(trajs[i].num_trained_tokens for i in kept)
            denominator = float(n_tokens if alg.agg_mode == "token-mean" else len(kept))
            members = self.micro_batches(trajs, [i for i in part if i in active])
            tensors = [self.tensors([trajs[i] for i in (mb or [0])], select(mb or [0])) for mb in members]
            out.append(Minibatch(members, tensors, denominator))
        return out, active

    def update(self, mb: Minibatch, prox: list[torch.Tensor] | None) -> tuple[dict, float, bool]:
        """One optimizer update on one minibatch: forward/backward per micro-batch (each loss divided by
        the minibatch's global denominator), clip, step. `prox` holds pi_prox per micro-batch, or None to
        take it from the gradient pass itself. Returns (sums over every rank, grad norm, applied)."""
        cfg, alg = self.cfg, self.cfg.algorithm
        # zeros, not None: AdamW skips parameters without a grad, a zero grad still applies momentum
        self.optimizer.zero_grad(set_to_none=False)
        sums = torch.zeros(len(UpdateStats.KEYS), dtype=torch.float64, device=self.device)  # summed on the device
        for members, batch, logp_prox in zip(mb.members, mb.tensors, prox or [None] * len(mb.tensors)):
            logp, entropy = self.logprobs(batch, with_entropy=True)
            if logp_prox is None:
                logp_prox = logp.detach()
            mask = batch.mask * (0.0 if members is None else 1.0)  # a stand-in micro-batch contributes nothing
            loss, stats = policy_loss(
                logp, logp_prox, batch.behav, batch.advantages, mask,
                eps_low=alg.eps_low, eps_high=alg.eps_high, behav_weight_cap=alg.behav_weight_cap,
                cap_mode=alg.behav_weight_cap_mode, loss_denominator=mb.denominator, agg_mode=alg.agg_mode,
                seq_index=batch.seq_index,
            )
            kl = torch.zeros((), device=self.device)
            if alg.kl_coef > 0:
                per_token = kl_penalty(logp, self.reference_logprobs(batch), alg.kl_estimator)
                kl = aggregate(per_token, mask, alg.agg_mode, mb.denominator, batch.seq_index)
                loss = loss + alg.kl_coef * kl
            if self.steps + 1 in cfg.trainer.inject_nan_steps:  # fault-injection test hook, off by default
                loss = loss * float("nan")
            # FSDP averages gradients over the ranks; the loss is already the global mean
            (loss * self.world_size if self.fsdp else loss).backward()
            sums += _token_sums(loss, kl, entropy, logp_prox, batch.behav, mask, stats)
        # one device-to-host transfer per update (after the all-reduce), not one per micro-batch
        sums = dict(zip(UpdateStats.KEYS, parallel.all_reduce_sum(sums, self.device)))
        grad_norm = full(torch.nn.utils.clip_grad_norm_(self.trained, cfg.trainer.grad_clip)).item()
        applied = math.isfinite(grad_norm) and math.isfinite(sums["loss"])
        if applied:
            self.optimizer.step()
            if self.ewma is not None:
                self.ewma.update(local(p) for p in self.trained)
        else:
            self.optimizer.zero_grad(set_to_none=False)
        return sums, grad_norm, applied


@torch.no_grad()
def _token_sums(loss, kl, entropy, logp_prox, logp_behav, mask, stats) -> torch.Tensor:
    """One micro-batch's contribution to UpdateStats.KEYS, as a float64 vector on the device.

    The behaviour/proximal gap over the trained tokens, d = logp_prox - logp_behav (0 but for kernel
    differences at zero lag, exactly 0 for coupled PPO): its sum, the k3 estimate of
    KL(pi_behav || pi_prox) on tokens sampled from pi_behav, e^d - 1 - d, and the sums of the behaviour
    weights w = e^d and of w^2 for their effective sample size (sum w)^2 / (N sum w^2), in float64
    (e^(2d) overflows float32 from d = 44)."""
    valid = mask > 0
    d = torch.where(valid, logp_prox - logp_behav, torch.zeros_like(logp_prox)).double()
    w = torch.where(valid, torch.exp(d), torch.zeros_like(d))
    return torch.stack([
        loss.detach().double(), kl.detach().double(), (entropy * mask).sum().double(), d.sum(),
        stats["tokens"].double(), stats["clipped"].double(), stats["approx_kl"].double(), stats["capped"].double(),
        torch.where(valid, torch.expm1(d) - d, torch.zeros_like(d)).sum(), w.sum(), (w * w).sum(),
    ])


def _layout_stats(minibatches: list[Minibatch]) -> dict:
    """This rank's micro-batches: how many, tokens in each, and the share of computed positions that are
    padding (0 when packed; a stand-in micro-batch of a rank short of work counts as padding)."""
    real, computed, count = 0, 0, 0
    for mb in minibatches:
        for members, b in zip(mb.members, mb.tensors):
            count += 1
            size = b.ids.numel()
            computed += size
            real += 0 if members is None else (size if isinstance(b, PackedBatch) else int(b.attn.sum()))
    return {"train/micro_batches": count, "train/tokens_per_micro_batch": computed / max(count, 1),
            "train/padding_frac": 1.0 - real / max(computed, 1)}
