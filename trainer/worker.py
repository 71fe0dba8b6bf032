"""The trainer worker: a Ray actor holding the policy, its optimizer and rank 0 of weight sync.

One `train_step` is one optimizer step on one batch (DESIGN.md section 3):
1. pi_prox log-probs: recomputed under the weights at the start of the step (AReaL, one extra
   forward pass, no grad), or under the bias-corrected EWMA of the weights (PPO-EWMA, Hilton
   et al. arXiv 2110.00641), or pi_behav itself for coupled PPO;
2. group advantages from the rewards (GRPO, Dr. GRPO, RLOO, or ReMax's greedy baseline),
   optionally normalised by EWMA statistics (batch-size invariance, DESIGN.md section 4);
3. forward/backward per micro-batch, every micro-batch loss divided by the number of
   valid tokens in the whole batch, so micro-batching does not change the gradient;
4. clip, step, and diagnostics summed over the whole step.
"""

from __future__ import annotations

import copy
import logging
import math
import resource
import socket
import time
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM

from rollout.trajectory import Trajectory
from rollout.weight_sync import broadcast_send, fingerprint, ipc_pack, make_group, metas_of
from trainer.advantages import EWMANormalizer, group_advantages
from trainer.invariance import EWMAParams, effective_hparams
from trainer.losses import aggregate, entropy_from_logits, kl_penalty, policy_loss, token_logprobs

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TrainerWorker:
    """Ray actor: `ray.remote(TrainerWorker).options(...).remote(cfg, model_dir)`."""

    def __init__(self, cfg, model_dir: str) -> None:
        logging.basicConfig(level=cfg.logger.log_level, format="%(asctime)s %(name)s: %(message)s")
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        if cfg.trainer.torch_threads:
            torch.set_num_threads(cfg.trainer.torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray hides GPUs not assigned
        # fp32 master weights; the engines get them cast to model.dtype at publish
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        self.model.train()
        self.sync_dtype = getattr(torch, cfg.model.dtype)
        self.hparams = effective_hparams(cfg)  # batch-size invariance derives these from the reference
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.hparams["lr"], betas=self.hparams["adam_betas"],
            weight_decay=cfg.trainer.weight_decay,
        )
        alg = cfg.algorithm
        # PPO-EWMA: one extra copy of the trained parameters, updated after every optimizer step
        self.ewma = None
        if alg.loss == "decoupled_ppo" and alg.proximal == "ewma":
            self.ewma = EWMAParams(self.model.parameters(), self.hparams["ewma_decay"], dtype=torch.float32)
            self.ewma.update(self.model.parameters())
        # KL to the frozen initial policy: a second copy of the model, forward only
        self.ref_model = None
        if alg.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.adv_norm = EWMANormalizer(self.hparams["adv_norm_span"]) if self.hparams["adv_norm_span"] else None
        self.group = None
        self.steps = 0

    # ---- weight sync (rank 0) ----------------------------------------------------------
    def sync_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        self.group = make_group(backend, host, port, 0, world_size, timeout_s)

    def param_metas(self):
        return metas_of((n, p.detach().to(self.sync_dtype) if p.dtype != self.sync_dtype else p)
                        for n, p in self.model.named_parameters())

    def _sync_tensors(self):
        """Every parameter in the engine dtype, with the metadata the receivers need."""
        named = list(self.model.named_parameters())
        tensors = [p.detach().to(self.sync_dtype) for _, p in named]
        return tensors, metas_of(zip([n for n, _ in named], tensors))

    def publish(self) -> dict:
        """Broadcast every parameter to the engines; returns bytes moved and seconds."""
        t0 = time.perf_counter()
        tensors, metas = self._sync_tensors()
        sent = broadcast_send(self.group, tensors, metas, self.cfg.weight_sync.bucket_mb << 20)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return {"bytes": sent, "seconds": time.perf_counter() - t0}

    def publish_ipc(self) -> dict:
        """Colocated: pack the weights into CUDA buffers and return their IPC handles. The buffers
        stay alive (one extra copy of the weights in the engine dtype) until `release_ipc`."""
        t0 = time.perf_counter()
        tensors, metas = self._sync_tensors()
        self._ipc_buffers, handles = ipc_pack(tensors, metas, self.cfg.weight_sync.bucket_mb << 20)
        torch.cuda.synchronize()  # the buffers must be written before another process reads them
        return {"handles": handles, "bytes": sum(b.numel() for b in self._ipc_buffers), "pack_s": time.perf_counter() - t0}

    def release_ipc(self) -> None:
        self._ipc_buffers = []

    def fingerprint(self) -> str:
        return fingerprint((p for p in self.model.parameters()), self.sync_dtype)

    # ---- training ----------------------------------------------------------------------
    def _batch_tensors(self, trajs: list[Trajectory]) -> dict[str, torch.Tensor]:
        """Right-padded token ids, plus (B, T) indices of the positions predicting each response token."""
        lengths = [t.num_tokens for t in trajs]
        resp_len = max(len(t.response_ids) for t in trajs)
        ids = torch.zeros(len(trajs), max(lengths), dtype=torch.long)  # (B, L)
        attn = torch.zeros_like(ids)
        pos = torch.zeros(len(trajs), resp_len, dtype=torch.long)  # (B, T)
        targets = torch.zeros(len(trajs), resp_len, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(trajs), resp_len)  # (B, T)
        behav = torch.zeros(len(trajs), resp_len)  # (B, T)
        for b, t in enumerate(trajs):
            seq = t.prompt_ids + t.response_ids
            ids[b, : len(seq)] = torch.tensor(seq)
            attn[b, : len(seq)] = 1
            n, p = len(t.response_ids), len(t.prompt_ids)
            pos[b, :n] = torch.arange(p - 1, p - 1 + n)  # logits at position j predict token j+1
            targets[b, :n] = torch.tensor(t.response_ids)
            mask[b, :n] = 1.0
            behav[b, :n] = torch.tensor(t.logp_behav)
        return {k: v.to(self.device) for k, v in
                dict(ids=ids, attn=attn, pos=pos, targets=targets, mask=mask, behav=behav).items()}

    def _logprobs(self, tb: dict[str, torch.Tensor], with_entropy: bool, model=None):
        """Log-probs of the response tokens under `model` (default: the policy), at the sampling
        temperature. Only response positions go through the LM head (the prompt's logits are never needed)."""
        model = model or self.model
        hidden = model.get_decoder()(input_ids=tb["ids"], attention_mask=tb["attn"]).last_hidden_state  # (B, L, H)
        h = torch.gather(hidden, 1, tb["pos"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, T, H)
        logits = model.get_output_embeddings()(h).float() / self.cfg.rollout.temperature  # (B, T, V)
        logp = token_logprobs(logits, tb["targets"])  # (B, T)
        entropy = entropy_from_logits(logits.detach()) if with_entropy else None
        return logp, entropy

    @torch.no_grad()
    def _proximal_logprobs(self, tensors: list[dict]) -> list[torch.Tensor]:
        alg = self.cfg.algorithm
        if alg.loss == "ppo":
            return [tb["behav"] for tb in tensors]  # coupled PPO: pi_prox = pi_behav
        if self.ewma is None:
            return [self._logprobs(tb, False)[0] for tb in tensors]  # recompute: weights at the step's start
        # EWMA: point the parameters at the averaged tensors for the forward pass (no copy), then back
        params = list(self.model.parameters())
        current = [p.data for p in params]
        for p, avg in zip(params, self.ewma.averaged()):
            p.data = avg
        try:
            return [self._logprobs(tb, False)[0] for tb in tensors]
        finally:
            for p, data in zip(params, current):
                p.data = data

    def _advantages(self, trajs: list[Trajectory], baselines: list[Trajectory]) -> torch.Tensor:
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
        if self.adv_norm is not None:
            self.adv_norm.update(adv)
            adv = self.adv_norm.normalize(adv)
        return adv

    def train_step(self, batch: list[Trajectory]) -> dict:
        t0 = time.perf_counter()
        cfg, alg = self.cfg, self.cfg.algorithm
        trajs = [t for t in batch if not t.is_baseline]
        rewards = torch.tensor([t.reward for t in trajs])  # (N,)
        advantages = self._advantages(trajs, [t for t in batch if t.is_baseline])
        n_tokens = sum(len(t.response_ids) for t in trajs)
        denominator = float(n_tokens if alg.agg_mode == "token-mean" else len(trajs))
        # A trajectory with advantage 0 adds exactly 0 to the policy-gradient loss and its gradient
        # (L = -w * min(u*0, clip(u)*0)), so it is left out of the forward/backward passes while its
        # tokens still count in the denominator: the same gradient for less compute. A sparse reward
        # makes most groups all-0 or all-1, so this often skips most of the batch. A KL term has a
        # gradient on every token, so with kl_coef > 0 every trajectory is trained on.
        active = [i for i in range(len(trajs)) if advantages[i] != 0 or alg.kl_coef > 0]
        mbs = [active[i : i + cfg.trainer.micro_batch_size] for i in range(0, len(active), cfg.trainer.micro_batch_size)]
        tensors = [self._batch_tensors([trajs[i] for i in mb]) for mb in mbs]

        prox = self._proximal_logprobs(tensors)

        # zeros, not None: AdamW skips parameters without a grad, a zero grad still applies momentum
        self.optimizer.zero_grad(set_to_none=False)
        sums: dict[str, float] = defaultdict(float)
        for mb, tb, logp_prox in zip(mbs, tensors, prox):
            logp, entropy = self._logprobs(tb, True)
            adv = advantages[mb].to(self.device).unsqueeze(1).expand_as(logp)  # (B, T)
            loss, stats = policy_loss(
                logp, logp_prox, tb["behav"], adv, tb["mask"],
                eps_low=alg.eps_low, eps_high=alg.eps_high, behav_weight_cap=alg.behav_weight_cap,
                cap_mode=alg.behav_weight_cap_mode, loss_denominator=denominator, agg_mode=alg.agg_mode,
            )
            if self.ref_model is not None:
                with torch.no_grad():
                    logp_ref = self._logprobs(tb, False, self.ref_model)[0]
                kl = aggregate(kl_penalty(logp, logp_ref, alg.kl_estimator), tb["mask"], alg.agg_mode, denominator)
                sums["kl"] += kl.item()
                loss = loss + alg.kl_coef * kl
            loss.backward()
            sums["loss"] += loss.item()
            sums["entropy"] += (entropy * tb["mask"]).sum().item()
            # engine-vs-trainer mismatch (zero lag would make this ~0 but for kernel differences)
            sums["prox_behav_diff"] += ((logp_prox - tb["behav"]) * tb["mask"]).sum().item()
            for k, v in stats.items():
                sums[k] += float(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.trainer.grad_clip).item()
        skipped = not (math.isfinite(grad_norm) and math.isfinite(sums["loss"]))
        if skipped:
            log.warning("Non-finite loss or gradient at step %d; skipping the optimizer step.", self.steps + 1)
            self.optimizer.zero_grad(set_to_none=False)
        else:
            self.optimizer.step()
            if self.ewma is not None:
                self.ewma.update(self.model.parameters())
        self.steps += 1
        tokens = max(sums["tokens"], 1.0)  # diagnostics are over the tokens that were trained on
        return {
            "loss/policy": sums["loss"] - alg.kl_coef * sums["kl"],
            "loss/kl": sums["kl"],
            "policy/clipfrac": sums["clipped"] / tokens,
            "policy/approx_kl": sums["approx_kl"] / tokens,
            "policy/entropy": sums["entropy"] / tokens,
            "policy/behav_weight_capped_frac": sums["capped"] / tokens,
            "policy/logp_prox_minus_behav": sums["prox_behav_diff"] / tokens,
            "policy/grad_norm": grad_norm,
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "rollout/response_len_mean": n_tokens / max(len(trajs), 1),
            "train/skipped_steps": int(skipped),
            "train/active_frac": len(active) / max(len(trajs), 1),  # trajectories with a non-zero advantage
            "policy/ewma_center_of_mass_steps": self.hparams["ewma_center_of_mass_steps"] if self.ewma else 0.0,
            "train/tokens": sum(t.num_tokens for t in trajs),
            "time/train_s": time.perf_counter() - t0,
            "memory/max_allocated_gib": self._max_memory_gib(),
        }

    def _max_memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)
