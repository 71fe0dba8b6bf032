"""The trainer worker: a Ray actor holding the policy, its optimizer and rank 0 of weight sync.

One `train_step` takes one batch and makes K = trainer.num_minibatches x trainer.ppo_epochs
optimizer steps on it (DESIGN.md section 3):
1. pi_prox log-probs, once for the whole step, before the first update: recomputed under the
   weights at the start of the step (AReaL, one extra forward pass, no grad), or under the
   bias-corrected EWMA of the weights (PPO-EWMA, Hilton et al. arXiv 2110.00641), or pi_behav
   itself for coupled PPO;
2. group advantages from the rewards (GRPO, Dr. GRPO, RLOO, or ReMax's greedy baseline),
   optionally normalised by EWMA statistics (batch-size invariance, DESIGN.md section 4);
3. per minibatch: forward/backward per micro-batch, every micro-batch loss divided by the
   number of valid tokens in the whole minibatch, so micro-batching does not change the
   gradient; clip, step. The second and later minibatches see u = pi_theta / pi_prox != 1, so
   the clip acts (with K = 1 and recompute, u = 1 and it never does);
4. diagnostics aggregated over every update (mean and max); the policy version advances once.

Every pass that is not the gradient pass (pi_prox, the KL reference) runs with dropout off, and
with trainer.disable_dropout (the default, as TRL) the gradient pass too.

With trainer.num_workers = N > 1 the N actors form one torch.distributed group and shard the
model with FSDP2 (trainer/parallel.py); every rank gets the whole batch and trains on its share.
Rank 0 gathers the full weights for a publish and writes checkpoints; every rank takes part in
the gathers. With model.lora.rank > 0 only PEFT adapters are trained (trainer/lora.py) and the
engines receive the merged weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import resource
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rollout.trajectory import Trajectory
from rollout.weight_sync import fingerprint, free_address
from trainer import lora, parallel
from trainer.logprobs import LogProbHead, install_logprob_head
from trainer.minibatch import UpdateStats, split_minibatches
from trainer.packing import PackedBatch, pack, pad, plan_micro_batches, use_packed_attention
from trainer.advantages import EWMANormalizer, group_advantages
from trainer.invariance import EWMAParams, effective_hparams
from trainer.losses import aggregate, entropy_from_logits, kl_penalty, policy_loss, token_logprobs
from trainer.parallel import full, local
from trainer.publisher import Publisher

log = logging.getLogger(__name__)


def cpu_threads(cfg, cores: int) -> int:
    """The trainer's intra-op threads on CPU when trainer.torch_threads is unset. Synchronous (eta = 0),
    the engines idle while it trains: every core of the node (Ray's OMP_NUM_THREADS would hold it to
    trainer.num_cpus). Asynchronous, they generate meanwhile: the cores they do not use, so that the
    two do not oversubscribe the node (2 cores, one engine, eta = 4: the step took 22.3 s with two
    threads against the engine's, 17.3 s with one)."""
    if cfg.staleness.max_staleness == 0:
        return cores
    engines = cfg.rollout.num_workers * cfg.rollout.num_cpus
    return max(1, min(cores, int(cores - engines)))


class TrainerWorker:
    """Ray actor: `ray.remote(TrainerWorker).options(...).remote(cfg, model_dir)`."""

    def __init__(self, cfg, model_dir: str, rank: int = 0, world_size: int = 1) -> None:
        logging.basicConfig(level=cfg.logger.log_level, format="%(asctime)s %(name)s: %(message)s")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray hides GPUs not assigned
        self.sync_dtype = getattr(torch, cfg.model.dtype)
        # bf16/fp16 compute over fp32 master weights on GPU: FSDP2's mixed precision, also on one rank
        self.mixed_precision = self.device.type == "cuda" and self.sync_dtype != torch.float32
        self.fsdp = parallel.uses_fsdp(cfg.trainer.fsdp, world_size, self.mixed_precision)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.trainer.torch_threads or cpu_threads(cfg, os.cpu_count() or 1))
        elif cfg.trainer.torch_threads:
            torch.set_num_threads(cfg.trainer.torch_threads)
        # fp32 master weights; the engines get them cast to model.dtype at publish
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        self.model.config.use_cache = False
        lc = cfg.model.lora
        self.lora_scale: dict[str, float] | None = None
        if lc.rank > 0:
            self.model = lora.add_lora(self.model, lc.rank, lc.alpha, lc.target_modules, lc.dropout)
            self.lora_scale = lora.scalings(self.model)
        if cfg.trainer.disable_dropout:
            _disable_dropout(self.model)
        self.packed = cfg.trainer.pack_sequences
        if self.packed:  # no compute on padding, log-probs from hidden states in chunks (trainer/packing.py)
            use_packed_attention(self.model)
            install_logprob_head(self.model)
        if cfg.trainer.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        # GPU without FSDP (trainer.fsdp=false): per-op autocast to model.dtype over the fp32 master weights
        self.autocast = self.mixed_precision and not self.fsdp
        self.hparams = effective_hparams(cfg)  # batch-size invariance derives these from the reference
        self.adv_norm = EWMANormalizer(self.hparams["adv_norm_span"]) if self.hparams["adv_norm_span"] else None
        self.publisher: Publisher | None = None  # built with the weight-sync plan (after FSDP sharding)
        self.steps = 0
        self.skipped_in_a_row = 0
        if not self.fsdp:
            self._build()

    def init_group(self, host: str, port: int, backend: str) -> None:
        """Join the trainer group (all ranks at once), shard the model, build the optimizer."""
        parallel.init_trainer_group(host, port, self.rank, self.world_size, backend, self.cfg.weight_sync.timeout_s)
        if self.fsdp:
            self._build()

    def _build(self) -> None:
        cfg, alg = self.cfg, self.cfg.algorithm
        # KL to the frozen initial policy: with LoRA the base model with the adapters switched off,
        # otherwise a second copy of the model, forward only (sharded like the policy)
        self.ref_model = None
        if alg.kl_coef > 0 and self.lora_scale is None:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            if self.fsdp:
                parallel.shard(self.ref_model, self._mp_dtype())
        if self.fsdp:
            parallel.shard(self.model, self._mp_dtype())
        self.trained = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.optimizer = torch.optim.AdamW(
            self.trained, lr=self.hparams["lr"], betas=self.hparams["adam_betas"], weight_decay=cfg.trainer.weight_decay,
        )
        warmup = cfg.trainer.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        # PPO-EWMA: one extra copy of the trained parameters (this rank's shards), updated after every step
        self.ewma = None
        if alg.loss == "decoupled_ppo" and alg.proximal == "ewma":
            self.ewma = EWMAParams([local(p) for p in self.trained], self.hparams["ewma_decay"], dtype=torch.float32)
            self.ewma.update(local(p) for p in self.trained)

    def _mp_dtype(self) -> torch.dtype | None:
        return self.sync_dtype if self.mixed_precision else None

    def uses_group(self) -> bool:
        """Whether this trainer needs `init_group` before training (FSDP2, also on one GPU)."""
        return self.fsdp

    # ---- weight sync (trainer/publisher.py; rank 0 sends, every rank takes part in the gathers) ----
    def sync_address(self) -> tuple[str, int]:
        return free_address()

    def set_sync_plan(self, plan: dict) -> None:
        """The engines' plan (every rank): rank 0 allocates the flat buffer in the engine dtype, once."""
        named = list(self.model.named_parameters())  # global shapes: no gather needed
        if self.lora_scale is not None:
            shapes = {lora.base_name(n): tuple(p.shape) for n, p in named if not lora.is_adapter(n)}
        else:
            shapes = {n: tuple(p.shape) for n, p in named}
        # the parameters are the sources (on one rank, FSDP's shard is the whole tensor) unless FSDP must
        # gather them from several ranks or LoRA merge them
        static = {n: local(p) for n, p in named} if self.world_size == 1 and self.lora_scale is None else None
        self.publisher = Publisher(self._named_for_engine, shapes, static, self.rank, self.device)
        self.publisher.set_plan(plan)

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        self.publisher.join(host, port, world_size, backend, timeout_s)

    def ipc_handle(self) -> bytes:
        return self.publisher.ipc_handle()

    def _named_for_engine(self):
        """(name, full fp32 tensor) of every weight the engines serve, under the base model's names:
        with LoRA the adapters are folded into their layers. Every rank must iterate it (gathers)."""
        named = ((n, full(p).detach()) for n, p in self.model.named_parameters())
        return lora.merge(named, self.lora_scale) if self.lora_scale is not None else named

    def publish(self) -> dict | None:
        """Fill the flat buffer and broadcast it to the engines; bytes moved and seconds (rank 0)."""
        return self.publisher.publish()

    def publish_ipc(self) -> dict | None:
        """Colocated: fill the flat buffer, which the engines then copy from; bytes and seconds (rank 0)."""
        return self.publisher.pack()

    def _rank0_only(self, named):
        """`named` on rank 0; elsewhere it is iterated (the gathers need every rank) and nothing kept."""
        if self.rank == 0:
            return named
        for _ in named:
            pass
        return iter(())

    def fingerprint(self) -> str | None:
        named = self._rank0_only(self._named_for_engine())
        return fingerprint((t for _, t in named), self.sync_dtype) if self.rank == 0 else None

    # ---- training ----------------------------------------------------------------------
    def _batch_tensors(self, trajs: list[Trajectory], advantages: torch.Tensor | None = None):
        """One micro-batch on the device: packed into one row (trainer.pack_sequences), or padded."""
        adv = torch.zeros(len(trajs)) if advantages is None else advantages
        return pack(trajs, adv, self.device) if self.packed else pad(trajs, adv, self.device)

    def _logprobs(self, batch, with_entropy: bool, model=None):
        """Log-probs (and entropy) of the response tokens under `model` (default: the policy), at the sampling
        temperature: (1, R) packed, (B, T) padded. Only the positions that predict a response token go
        through the LM head."""
        model = model or self.model
        temperature = self.cfg.rollout.temperature
        with torch.autocast(self.device.type, dtype=self.sync_dtype, enabled=self.autocast):
            if isinstance(batch, PackedBatch):
                head = _output_head(model)
                head.targets, head.temperature, head.want_entropy = batch.targets, temperature, with_entropy
                logp = model(**batch.forward_kwargs(), logits_to_keep=batch.predict_at).logits  # (1, R)
                entropy = head.entropy
                head.targets = head.entropy = None
                return logp, entropy
            T = batch.targets.shape[1]
            out = model(input_ids=batch.ids, attention_mask=batch.attn, position_ids=batch.positions,
                        logits_to_keep=T + 1, use_cache=False)
        logits = out.logits[:, :-1].float() / temperature  # (B, T, V)
        logp = token_logprobs(logits, batch.targets)  # (B, T)
        entropy = entropy_from_logits(logits.detach()) if with_entropy else None
        return logp, entropy

    @contextlib.contextmanager
    def _ewma_weights(self):
        """The EWMA averages in place of the trained weights (this rank's shards), restored after."""
        current = [local(p).detach().clone() for p in self.trained]
        with torch.no_grad():
            for p, avg in zip(self.trained, self.ewma.averaged()):
                local(p).copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, data in zip(self.trained, current):
                    local(p).copy_(data)

    @contextlib.contextmanager
    def _dropout_off(self):
        """Eval mode for a pass that is not the gradient pass: pi_prox and the reference must be the
        deterministic policy, or two passes over the same batch differ and u != 1 at unchanged weights."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _proximal_logprobs(self, tensors: list[dict]) -> list[torch.Tensor]:
        alg = self.cfg.algorithm
        if alg.loss == "ppo":
            return [tb.behav for tb in tensors]  # coupled PPO: pi_prox = pi_behav
        with self._dropout_off():
            if self.ewma is None:
                return [self._logprobs(tb, False)[0] for tb in tensors]  # recompute: weights at the step's start
            with self._ewma_weights():
                return [self._logprobs(tb, False)[0] for tb in tensors]

    @torch.no_grad()
    def _reference_logprobs(self, tb: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return self._logprobs(tb, False, self.ref_model)[0]  # kept in eval mode
        with self._dropout_off(), self.model.disable_adapter():  # LoRA: the frozen base model is the reference
            return self._logprobs(tb, False)[0]

    def _advantages(self, trajs: list[Trajectory], baselines: list[Trajectory]):
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
            # statistics with this batch in them; kept only if the step is taken (a skipped step must
            # not move them)
            pending = self.adv_norm.updated(adv)
            adv = pending.normalize(adv)
        return adv, pending

    def _micro_batches(self, trajs: list[Trajectory], active: list[int]) -> list[list[int] | None]:
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

    def train_step(self, batch: list[Trajectory]) -> dict:
        """One training step; with the step in trainer.profile_steps, under torch.profiler (trace and table in
        output_dir/profile/)."""
        if self.steps + 1 not in self.cfg.trainer.profile_steps:
            return self._train_step(batch)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=False) as prof:
            metrics = self._train_step(batch)
        out = Path(self.cfg.output_dir) / "profile"
        out.mkdir(parents=True, exist_ok=True)
        name = f"trainer_step_{self.steps:04d}_rank{self.rank}"
        prof.export_chrome_trace(str(out / f"{name}.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (out / f"{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
        return metrics

    def _sync(self) -> float:
        """perf_counter after the device finished its queued work (a CPU-GPU sync point on GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _train_step(self, batch: list[Trajectory]) -> dict:
        t0 = time.perf_counter()
        cfg, alg, tc = self.cfg, self.cfg.algorithm, self.cfg.trainer
        trajs = [t for t in batch if not t.is_baseline]
        rewards = torch.tensor([t.reward for t in trajs])  # (N,)
        advantages, pending_norm = self._advantages(trajs, [t for t in batch if t.is_baseline])
        # algorithm.mask_truncated: a response cut at rollout.max_new_tokens gets no loss (it stays in the
        # group's baseline and in the metrics), and leaves the token-mean denominator
        trained = [not (alg.mask_truncated and t.finish_reason == "length") for t in trajs]
        # A trajectory with advantage 0 adds exactly 0 to the policy-gradient loss and its gradient
        # (L = -w * min(u*0, clip(u)*0)), so it is left out of the forward/backward passes while its
        # tokens still count in the denominator: the same gradient for less compute. A sparse reward
        # makes most groups all-0 or all-1, so this often skips most of the batch. A KL term has a
        # gradient on every token, so with kl_coef > 0 every trajectory is trained on.
        active = {i for i in range(len(trajs)) if trained[i] and (advantages[i] != 0 or alg.kl_coef > 0)}
        minibatches = []
        for part in split_minibatches(len(trajs), tc.num_minibatches):
            kept = [i for i in part if trained[i]]
            n_tokens = sum(trajs[i].num_trained_tokens for i in kept)
            denominator = float(n_tokens if alg.agg_mode == "token-mean" else len(kept))
            mbs = self._micro_batches(trajs, [i for i in part if i in active])
            tensors = [self._batch_tensors([trajs[i] for i in (mb or [0])], advantages[mb or [0]]) for mb in mbs]
            minibatches.append((mbs, tensors, denominator))
        # pi_prox is fixed for the whole step: computed once, before the first update. With one update
        # and recompute it is the policy at that update, so the gradient pass's own log-probs serve
        # (detached) and the extra forward pass is saved.
        t_batch = self._sync()
        single = tc.num_minibatches * tc.ppo_epochs == 1 and alg.loss == "decoupled_ppo" and self.ewma is None
        prox = [None if single else self._proximal_logprobs(tensors) for _, tensors, _ in minibatches]
        t_prox = self._sync()

        stats = UpdateStats()
        for _ in range(tc.ppo_epochs):
            for (mbs, tensors, denominator), prox_mb in zip(minibatches, prox):
                if denominator > 0:  # a minibatch with nothing to train on (all truncated and masked) makes no update
                    stats.add(*self._update(mbs, tensors, prox_mb, denominator))
        skipped = stats.skipped > 0
        if skipped:
            self.skipped_in_a_row += 1
            log.warning("Non-finite loss or gradient at step %d in %d of %d updates; skipping those optimizer "
                        "updates (%d steps in a row).", self.steps + 1, stats.skipped, stats.updates, self.skipped_in_a_row)
        else:
            self.skipped_in_a_row = 0
        t_update = self._sync()
        if pending_norm is not None and stats.applied > 0:
            self.adv_norm = pending_norm
        self.scheduler.step()  # the learning-rate schedule counts training steps, not updates
        self.steps += 1
        return {
            **stats.metrics(alg.kl_coef),
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "reward/overlong_penalty_mean": sum(t.info.get("overlong_penalty", 0.0) for t in trajs) / max(len(trajs), 1),
            "rollout/response_len_mean": sum(len(t.response_ids) for t in trajs) / max(len(trajs), 1),
            "rollout/truncated_frac": sum(t.finish_reason == "length" for t in trajs) / max(len(trajs), 1),
            "train/skipped_steps": int(skipped),
            "train/skipped_in_a_row": self.skipped_in_a_row,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/active_frac": len(active) / max(len(trajs), 1),  # trajectories trained on (non-zero advantage)
            "policy/ewma_center_of_mass_steps": self.hparams["ewma_center_of_mass_steps"] if self.ewma else 0.0,
            "train/tokens": sum(t.num_tokens for t in trajs),
            **self._layout_stats(minibatches),
            "time/train_s": time.perf_counter() - t0,
            # where the step's time went: building and moving the micro-batches, the pi_prox pass, the updates
            "time/train_batch_s": t_batch - t0, "time/train_prox_s": t_prox - t_batch, "time/train_update_s": t_update - t_prox,
            "memory/max_allocated_gib": self._max_memory_gib(),
        }

    def _layout_stats(self, minibatches) -> dict:
        """This rank's micro-batches: how many, tokens in each, and the share of computed positions that are
        padding (0 when packed; a stand-in micro-batch of a rank short of work counts as padding)."""
        real, computed, count = 0, 0, 0
        for mbs, tensors, _ in minibatches:
            for mb, b in zip(mbs, tensors):
                count += 1
                size = b.ids.numel()
                computed += size
                real += 0 if mb is None else (size if isinstance(b, PackedBatch) else int(b.attn.sum()))
        return {"train/micro_batches": count, "train/tokens_per_micro_batch": computed / max(count, 1),
                "train/padding_frac": 1.0 - real / max(computed, 1)}

    def _update(self, mbs, tensors, prox, denominator: float) -> tuple[dict, float, bool]:
        """One optimizer update on one minibatch: forward/backward per micro-batch (each loss divided by
        the minibatch's global `denominator`), clip, step. `prox` holds pi_prox per micro-batch, or None to
        take it from the gradient pass itself. Returns (sums over every rank, grad norm, applied)."""
        cfg, alg = self.cfg, self.cfg.algorithm
        # zeros, not None: AdamW skips parameters without a grad, a zero grad still applies momentum
        self.optimizer.zero_grad(set_to_none=False)
        sums = torch.zeros(len(UpdateStats.KEYS), dtype=torch.float64, device=self.device)  # summed on the device
        for mb, batch, logp_prox in zip(mbs, tensors, prox or [None] * len(mbs)):
            logp, entropy = self._logprobs(batch, True)
            if logp_prox is None:
                logp_prox = logp.detach()
            weight = 0.0 if mb is None else 1.0  # a stand-in micro-batch contributes nothing
            mask = batch.mask * weight
            loss, stats = policy_loss(
                logp, logp_prox, batch.behav, batch.advantages, mask,
                eps_low=alg.eps_low, eps_high=alg.eps_high, behav_weight_cap=alg.behav_weight_cap,
                cap_mode=alg.behav_weight_cap_mode, loss_denominator=denominator, agg_mode=alg.agg_mode,
                seq_index=batch.seq_index,
            )
            kl = torch.zeros((), device=self.device)
            if alg.kl_coef > 0:
                logp_ref = self._reference_logprobs(batch)
                kl = aggregate(kl_penalty(logp, logp_ref, alg.kl_estimator), mask, alg.agg_mode, denominator,
                               batch.seq_index)
                loss = loss + alg.kl_coef * kl
            if self.steps + 1 in cfg.trainer.inject_nan_steps:  # fault-injection test hook, off by default
                loss = loss * float("nan")
            # FSDP averages gradients over the ranks; the loss is already the global token-mean
            (loss * self.world_size if self.fsdp else loss).backward()
            with torch.no_grad():
                # engine-vs-trainer mismatch (zero lag would make this ~0 but for kernel differences)
                diff = torch.where(mask > 0, logp_prox - batch.behav, torch.zeros_like(logp_prox))
                sums += torch.stack([loss.detach(), kl.detach(), (entropy * mask).sum(), (diff * mask).sum(),
                                     stats["tokens"], stats["clipped"], stats["approx_kl"], stats["capped"]]).double()
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

    # ---- checkpoint and export ---------------------------------------------------------
    def probe_output_dir(self, path: str, token: str) -> str:
        """Write `token` to `path` (a file in output_dir) and return this node's address. The driver
        reads the file back at setup: rank 0 writes checkpoints and the export where the driver reads
        them, so the two must see the same output_dir."""
        import ray

        Path(path).write_text(token)
        return ray.util.get_node_ip_address()

    def save(self, path: str) -> None:
        """Write trainer.pt into the checkpoint directory `path` (rank 0; every rank gathers):
        full trained weights (LoRA: the adapters only), optimizer, scheduler, EWMA, advantage
        statistics, step and RNG states. Tensors and plain containers only: it loads with
        torch.load(weights_only=True)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=opts)
        ewma = None
        if self.ewma is not None:
            gathered = (full(self._as_param_layout(a, p)) for a, p in zip(self.ewma.averaged(), self.trained))
            ewma = [t.cpu() for t in self._rank0_only(gathered)]
        if self.rank != 0:
            return
        if self.lora_scale is not None:
            model_sd = {k: v for k, v in model_sd.items() if lora.is_adapter(k)}
        state = {
            "model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), "steps": self.steps,
            "ewma": None if ewma is None else {"avg": ewma, "num_updates": self.ewma.num_updates,
                                               "beta": self.ewma.beta},
            "adv_norm": self.adv_norm.state_dict() if self.adv_norm is not None else None,
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None},
            "skipped_in_a_row": self.skipped_in_a_row,
        }
        torch.save(state, Path(path) / "trainer.pt")

    def _as_param_layout(self, avg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """An EWMA shard as a tensor laid out like its parameter (a DTensor under FSDP)."""
        from torch.distributed.tensor import DTensor

        if isinstance(p, DTensor):
            return DTensor.from_local(avg, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return avg

    def load(self, path: str) -> int:
        """Restore from a checkpoint directory written by `save`; every rank reads the file.
        Returns the step the checkpoint was taken after."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=True)
        strict = self.lora_scale is None  # LoRA checkpoints hold the adapters only
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=strict))
        self.scheduler.load_state_dict(state["scheduler"])
        if (state["ewma"] is None) != (self.ewma is None):
            raise ValueError(f"checkpoint {path} was written with algorithm.proximal "
                             f"{'ewma' if state['ewma'] else 'other than ewma'}; resume with the same setting")
        if self.ewma is not None:
            self.ewma.beta, self.ewma.num_updates = float(state["ewma"]["beta"]), int(state["ewma"]["num_updates"])
            with torch.no_grad():
                for avg, whole, p in zip(self.ewma.averaged(), state["ewma"]["avg"], self.trained):
                    avg.copy_(parallel.shard_of(whole, p))
        if self.adv_norm is not None and state["adv_norm"] is not None:
            self.adv_norm.load_state_dict(state["adv_norm"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        self.steps = int(state["steps"])
        self.skipped_in_a_row = int(state["skipped_in_a_row"])
        return self.steps

    def export_hf(self, out_dir: str, model_dir: str) -> None:
        """The policy as a Hugging Face directory (merged weights in model.dtype, tokenizer, config),
        plus `<out_dir>/adapter` (PEFT format) with LoRA. Rank 0 writes; every rank gathers."""
        merged = {n: t.to(self.sync_dtype).cpu() for n, t in self._rank0_only(self._named_for_engine())}
        adapters = ((n, full(p).detach()) for n, p in self.model.named_parameters() if lora.is_adapter(n))
        adapter = {n: t.cpu() for n, t in self._rank0_only(adapters)}
        if self.rank != 0:
            return
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=self.sync_dtype)
        skeleton.save_pretrained(tmp, state_dict=merged)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        if self.lora_scale is not None:
            self.model.save_pretrained(tmp / "adapter", state_dict=adapter)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)

    def _max_memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def _disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every pass (trainer.disable_dropout, as TRL's GRPOConfig.disable_dropout): dropout
    modules get p = 0, and attention layers that read a float `attention_dropout` get 0 (Hugging Face
    models apply it inside the attention function while training)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _output_head(model: torch.nn.Module) -> LogProbHead:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()
