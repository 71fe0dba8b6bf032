"""The trainer worker: a Ray actor around one rank's policy step (trainer/step.py), its state
(trainer/state.py) and its end of the weight sync (weight_sync/send.py).

    trainer = ray.remote(TrainerWorker).options(...).remote(cfg, model_dir, rank, world_size)
    if trainer.uses_group(): trainer.init_group(address)        # every rank at once: FSDP2
    trainer.set_sync_plan(plan); trainer.init_weight_sync(address)   # the engines' plan, the group
    metrics = trainer.train_step(batch); trainer.publish()
    trainer.save(dir); trainer.load(dir); trainer.export_hf(dir, model_dir)

With trainer.num_workers = N > 1 the N actors form one torch.distributed group and shard the model
with FSDP2 (trainer/parallel.py), as they do on one GPU with bf16 compute (FSDP2's mixed precision);
rank 0 sends the weights and writes checkpoints, every rank takes part in the gathers. With
model.lora.rank > 0 only PEFT adapters are trained (trainer/lora.py) and the engines receive the
merged weights. With algorithm.advantage=gae a critic (trainer/critic.py) is held here beside the
policy step: its values give the batch's GAE advantages, then each trains on the same batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rollout.trajectory import Trajectory
from rewards.reward_model import decoder_and_head
from trainer import cpu_share, lora, parallel, state
from trainer.cpu_share import CoreShare
from trainer.critic import CriticStep, targets
from trainer.model import load_causal_lm
from trainer.parallel import local
from trainer.step import PolicyStep
from weight_sync.messages import GroupAddress, SendReport
from weight_sync.plan import SyncPlan
from weight_sync.receive import fingerprint
from weight_sync.send import Publisher
from weight_sync.transport import free_address


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
        if self.device.type != "cpu" and cfg.trainer.torch_threads:
            torch.set_num_threads(cfg.trainer.torch_threads)
        self.model, self.lora_scale = load_causal_lm(cfg, model_dir, self.device)
        self.critic_model = CriticStep.load_model(cfg, model_dir, self.device) if cfg.algorithm.advantage == "gae" else None
        self.cores: CoreShare | None = None  # on CPU at eta > 0: the threads follow the node's free cores
        if self.device.type == "cpu":
            layers = parallel.decoder_layers(self.model)
            if self.critic_model is not None:
                layers += list(decoder_and_head(self.critic_model)[0].layers)
            self.cores = cpu_share.setup(cfg, layers)
        self.step: PolicyStep | None = None  # built once the model can be sharded (after init_group with FSDP)
        self.critic: CriticStep | None = None
        self.publisher: Publisher | None = None  # built with the weight-sync plan (after sharding)
        if not self.fsdp:
            self._build()

    def _build(self) -> None:
        self.step = PolicyStep(self.cfg, self.model, self.lora_scale, self.device, self.rank, self.world_size,
                               self.fsdp, self.mixed_precision)
        if self.critic_model is not None:
            self.critic = CriticStep(self.cfg, self.critic_model, self.device, self.rank, self.world_size, self.fsdp,
                                     self.mixed_precision)

    def uses_group(self) -> bool:
        """Whether this trainer needs `init_group` before training (FSDP2, also on one GPU)."""
        return self.fsdp

    def init_group(self, address: GroupAddress) -> None:
        """Join the trainer group (all ranks at once), shard the model, build the optimizer."""
        parallel.init_trainer_group(address.host, address.port, self.rank, self.world_size, address.backend,
                                    address.timeout_s)
        if self.fsdp:
            self._build()

    # ---- weight sync (weight_sync/send.py; rank 0 sends, every rank takes part in the gathers) ----
    def sync_address(self) -> tuple[str, int]:
        return free_address()

    def set_sync_plan(self, plan: SyncPlan) -> None:
        """The engines' plan (every rank): rank 0 allocates the flat buffer in the engine dtype, once."""
        named = list(self.model.named_parameters())  # global shapes: no gather needed
        if self.lora_scale is not None:
            shapes = {lora.base_name(n): tuple(p.shape) for n, p in named if not lora.is_adapter(n)}
        else:
            shapes = {n: tuple(p.shape) for n, p in named}
        # the parameters are the sources (on one rank, FSDP's shard is the whole tensor) unless FSDP must
        # gather them from several ranks or LoRA merge them
        static = {n: local(p) for n, p in named} if self.world_size == 1 and self.lora_scale is None else None
        self.publisher = Publisher(lambda: state.full_weights(self.step), shapes, static, self.rank, self.device)
        self.publisher.set_plan(plan)

    def init_weight_sync(self, address: GroupAddress) -> None:
        self.publisher.join(address)

    def ipc_handle(self) -> bytes:
        return self.publisher.ipc_handle()

    def publish(self) -> SendReport | None:
        """Fill the flat buffer and broadcast it to the engines; bytes moved and seconds (rank 0)."""
        return self.publisher.publish()

    def publish_ipc(self) -> SendReport | None:
        """Colocated: fill the flat buffer, which the engines then copy from; bytes and seconds (rank 0)."""
        return self.publisher.pack()

    def fingerprint(self) -> str | None:
        named = state.rank0_only(self.rank, state.full_weights(self.step))
        return fingerprint((t for _, t in named), self.sync_dtype) if self.rank == 0 else None

    # ---- training, checkpoints, export --------------------------------------------------
    def train_step(self, batch: list[Trajectory]) -> dict:
        changes = self.cores.changes if self.cores is not None else 0
        metrics = self._train_step(batch)
        if self.cores is not None:  # how the trainer's threads followed the node during the step
            metrics["train/cpu_threads_changes"] = self.cores.changes - changes
            metrics["train/cpu_others_busy"] = self.cores.others_busy
        return metrics

    def _train_step(self, batch: list[Trajectory]) -> dict:
        if self.critic is None:
            return self.step.train_step(batch)
        # PPO with a critic: values by the critic as it is now, GAE, then the critic's and the policy's updates
        trajs = [t for t in batch if not t.is_baseline]
        values = self.critic.values(trajs)
        advantages, returns = targets(trajs, values, self.cfg)
        critic_metrics = self.critic.train_step(trajs, returns, values)
        warming_up = self.step.steps < self.cfg.critic.warmup_steps  # only the critic trains
        metrics = self.step.train_step(batch, advantages, update=not warming_up)
        return {**metrics, **critic_metrics, "critic/warmup": int(warming_up)}

    def save(self, path: str) -> None:
        state.save(self.step, path)
        if self.critic is not None:
            state.save_critic(self.critic, self.rank, path)

    def load(self, path: str) -> int:
        if self.critic is not None:
            state.load_critic(self.critic, path)
        return state.load(self.step, path)

    def export_hf(self, out_dir: str, model_dir: str) -> None:
        state.export_hf(self.step, out_dir, model_dir)

    def probe_output_dir(self, path: str, token: str) -> str:
        """Write `token` to `path` (a file in output_dir) and return this node's address. The driver
        reads the file back at setup: rank 0 writes checkpoints and the export where the driver reads
        them, so the two must see the same output_dir."""
        import ray

        Path(path).write_text(token)
        return ray.util.get_node_ip_address()
