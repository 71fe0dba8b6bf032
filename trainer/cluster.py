"""The Ray cluster a run uses: connect to it, turn the automatic settings into concrete ones,
lay the actors out on its GPUs and reserve their resources.

    connect(cfg)                      # RAY_ADDRESS / ray.address, else a local instance sized to the actors
    resolve(cfg, cluster_gpus)        # every "auto" (None) field -> a concrete value; returns what was chosen
    layout(cfg) -> dict               # GPUs per actor, colocation, weight-sync backend
    Placement(cfg, layout)            # which GPU each actor gets: check_resources, reserve, trainer(k)/worker(i) options
    prepare(cfg) -> (layout, placement)   # all of the above in order, with one log line of the choices

Ray's CPUs are logical: a local instance this module starts gets max(cores, what the actors ask
for) of them, so `rollout.num_workers=2` runs on a 2-core machine (the actors share the cores). An
existing cluster is never resized: a request it cannot host fails before any actor starts.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from configs.schema import ConfigError, validate_resolved

log = logging.getLogger("tether")

# every actor of a run gets these (and the worker processes they start)
RUNTIME_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}}
CPU_KV_CACHE_GIB = 0.5  # rollout.kv_cache_gib chosen for an engine on CPU (vLLM cannot size it there)
# trainer.max_tokens_per_micro_batch chosen for a trainer rank on a GPU and on CPU. On CPU (float32) the
# bundled 135M model keeps about 1.7 MB of activations per token: one step of 32 trajectories of 450
# tokens peaked at 14.7 GiB of memory with 8192 and 5.9 GiB with 2048 (and was no slower)
GPU_TOKENS_PER_MICRO_BATCH, CPU_TOKENS_PER_MICRO_BATCH = 8192, 2048
CPU_CONCURRENT_GROUPS = 4  # rollout.max_concurrent_groups on CPU (and the least on a GPU)


def num_scorers(cfg) -> int:
    """Reward-model scorer actors: rewards.model.num_scorers, or one per rollout worker; none without a model."""
    m = cfg.rewards.model
    return 0 if m.path is None else (m.num_scorers or cfg.rollout.num_workers)


def cpus_needed(cfg) -> float:
    return (cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.trainer.num_workers * cfg.trainer.num_cpus
            + num_scorers(cfg) * cfg.rewards.model.num_cpus)


_started_here = False  # this process started the Ray instance it is connected to


def connect(cfg) -> bool:
    """Join the cluster named by ray.address or RAY_ADDRESS, or start a local instance.

    Returns True when the instance is a local one started here. Its logical CPUs are ray.num_cpus,
    or max(os.cpu_count(), the CPUs the actors ask for); a later run of a sweep that asks for more
    gets a new one."""
    global _started_here
    if ray.is_initialized():
        if not (_started_here and cfg.ray.num_cpus is None
                and ray.cluster_resources().get("CPU", 0) < cpus_needed(cfg)):
            return _started_here
        ray.shutdown()
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=RUNTIME_ENV, log_to_driver=True)
        return False
    cores = os.cpu_count() or 1
    need = math.ceil(cpus_needed(cfg))
    num_cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else max(cores, need)
    if num_cpus > cores:
        log.info("local Ray instance with %d logical CPUs on %d cores: the actors ask for %g (they share the cores)",
                 num_cpus, cores, cpus_needed(cfg))
    # address="local": a new instance even when `ray start` left one running on this machine;
    # dashboard bound to loopback: a local run exposes nothing to the network
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1",
             runtime_env=RUNTIME_ENV)
    _started_here = True
    return True


def resolve(cfg, cluster_gpus: float) -> dict:
    """Give every automatic (None) field its value for a cluster with `cluster_gpus` GPUs.

    With GPUs: one GPU per actor (rollout.tensor_parallel_size per engine), trainer and engines
    colocated on a 1-GPU cluster and on separate GPUs otherwise, a bfloat16 engine with CUDA
    graphs and a KV cache sized from rollout.gpu_memory_utilization, a trainer token budget of 8192 per
    micro-batch, each engine generating its share of the staleness window's groups at once. Without: the
    CPU values (float32, eager, a 0.5 GiB cache, 2048 tokens per micro-batch, 4 groups at once).
    A field the user set is left alone. Returns {key: chosen value} of the fields it filled."""
    r, t = cfg.rollout, cfg.trainer
    chosen: dict = {}

    def pick(node, prefix: str, key: str, value) -> None:
        if getattr(node, key) is None:
            setattr(node, key, value)
            chosen[f"{prefix}.{key}"] = value

    gpu = cluster_gpus > 0
    pick(r, "rollout", "num_gpus", float(r.tensor_parallel_size) if gpu else 0.0)
    pick(t, "trainer", "num_gpus", 1.0 if gpu else 0.0)
    pick(r, "rollout", "colocate", cluster_gpus == 1 and r.num_gpus > 0 and t.num_gpus > 0)
    engine_gpu = r.num_gpus > 0  # the engine's own placement decides its dtype, graphs and cache
    pick(cfg.model, "model", "dtype", "bfloat16" if engine_gpu else "float32")
    pick(r, "rollout", "enforce_eager", not engine_gpu)
    if r.kv_cache_gib is None and not engine_gpu:
        pick(r, "rollout", "kv_cache_gib", CPU_KV_CACHE_GIB)
    elif r.kv_cache_gib is None:
        chosen["rollout.kv_cache_gib"] = None  # stays unset on a GPU: vLLM sizes it from gpu_memory_utilization
    if cfg.weight_sync.backend == "auto":
        cfg.weight_sync.backend = "ipc" if r.colocate else ("nccl" if r.num_gpus > 0 and t.num_gpus > 0 else "gloo")
        chosen["weight_sync.backend"] = cfg.weight_sync.backend
    pick(t, "trainer", "max_tokens_per_micro_batch",
         GPU_TOKENS_PER_MICRO_BATCH if t.num_gpus > 0 else CPU_TOKENS_PER_MICRO_BATCH)
    # a GPU engine decodes its sequences together, so it is fastest with as many in flight as admission
    # allows: its share of the staleness window. On CPU more at once only shares the same cores.
    window = (cfg.staleness.max_staleness + 1) * t.batch_size // t.group_size
    pick(r, "rollout", "max_concurrent_groups",
         max(CPU_CONCURRENT_GROUPS, math.ceil(window / r.num_workers)) if engine_gpu else CPU_CONCURRENT_GROUPS)
    return chosen


def layout(cfg) -> dict:
    """GPUs per actor and the weight-sync backend of a resolved config.

    Disaggregated: rollout.num_gpus per engine, trainer.num_gpus per trainer rank. Colocated
    (rollout.colocate): trainer and engines share one GPU: the trainer takes half of it and the R
    engines the other half between them (each engine's memory is rollout.gpu_memory_utilization),
    and weights move by CUDA IPC handles. Reward-model scorers on fractions of a GPU
    (rewards.model.num_gpus < 1) take theirs off both halves, so that all of them share the one GPU.
    These fractions are Ray's bookkeeping; memory is what each process allocates."""
    r, t = cfg.rollout, cfg.trainer
    if r.colocate:
        sg = cfg.rewards.model.num_gpus
        share = 1.0 - (num_scorers(cfg) * sg if _fraction(sg) else 0.0)
        if share <= 0:
            raise ConfigError(f"rewards.model.num_gpus={sg:g}: {num_scorers(cfg)} scorer(s) take the whole shared "
                              "GPU from the colocated trainer and engines; lower it")
        rollout_gpus, trainer_gpus = share / 2 / r.num_workers, share / 2
    else:
        rollout_gpus, trainer_gpus = r.num_gpus, t.num_gpus
    return {"colocate": bool(r.colocate), "rollout_gpus": rollout_gpus, "trainer_gpus": trainer_gpus,
            "backend": cfg.weight_sync.backend}


def _fraction(gpus: float) -> bool:
    return 0 < gpus < 1


@dataclass
class Placement:
    """Which GPU each actor gets, and the placement groups that hold them.

    Whole GPUs (or none): one placement group for the trainer ranks (a bundle each) and one per
    engine, as Ray places them. Fractions of a GPU: Ray would pack fractional bundles onto the
    first GPU with room, which could put two trainer ranks on one device (NCCL refuses that) or an
    engine on trainer rank 0's GPU with NCCL between them. Here instead every shared GPU is one
    bundle {GPU: 1} and the actors are assigned to them: trainer rank k on GPU k, each engine on
    the first GPU with room — never rank 0's with NCCL weight sync (two ranks of one NCCL group
    cannot share a device), always rank 0's with CUDA IPC (colocated)."""

    cfg: object
    layout: dict
    shared: list[list[tuple[str, int]]] = field(default_factory=list)  # per shared GPU: (role, index) on it
    where: dict = field(default_factory=dict)  # (role, index) -> shared GPU index
    groups: list = field(default_factory=list)
    _strategies: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        r, t = self.cfg.rollout, self.cfg.trainer
        tg, rg = self.layout["trainer_gpus"], self.layout["rollout_gpus"]
        free: list[float] = []
        if _fraction(tg):
            for k in range(t.num_workers):  # each rank its own device
                self.shared.append([("trainer", k)])
                self.where[("trainer", k)] = k
                free.append(1.0 - tg)
        if _fraction(rg):
            backend = self.layout["backend"]
            rank0 = 0 if _fraction(tg) else None  # the shared GPU of trainer rank 0, if it has one

            def fits(d: int) -> bool:
                if free[d] < rg - 1e-9:
                    return False
                if backend == "ipc":  # CUDA IPC: the engine reads trainer rank 0's memory on its device
                    return rank0 is None or d == rank0
                if backend == "nccl":  # one NCCL group: rank 0 and every engine on distinct devices
                    return d != rank0 and all(role != "rollout" for role, _ in self.shared[d])
                return True

            for i in range(r.num_workers):
                d = next((d for d in range(len(free)) if fits(d)), None)
                if d is None and backend == "ipc" and rank0 is not None:
                    raise ConfigError(f"rollout.num_gpus: {r.num_workers} engine(s) of {rg:g} GPU do not fit beside "
                                      f"trainer rank 0 ({tg:g} GPU) on its GPU, which colocated engines must share")
                if d is None:
                    d = len(free)
                    self.shared.append([])
                    free.append(1.0)
                self.shared[d].append(("rollout", i))
                self.where[("rollout", i)] = d
                free[d] -= rg
        sg = self.cfg.rewards.model.num_gpus
        if _fraction(sg):  # reward-model scorers: beside whatever has room (they join no NCCL group)
            for j in range(num_scorers(self.cfg)):
                d = next((d for d in range(len(free)) if free[d] >= sg - 1e-9), None)
                if d is None:
                    d = len(free)
                    self.shared.append([])
                    free.append(1.0)
                self.shared[d].append(("scorer", j))
                self.where[("scorer", j)] = d
                free[d] -= sg

    def gpus_needed(self) -> float:
        """Whole GPUs the placement occupies (a shared GPU counts as one)."""
        r, t = self.cfg.rollout, self.cfg.trainer
        tg, rg = self.layout["trainer_gpus"], self.layout["rollout_gpus"]
        sg = self.cfg.rewards.model.num_gpus
        own = (0 if _fraction(tg) else t.num_workers * tg) + (0 if _fraction(rg) else r.num_workers * rg) \
            + (0 if _fraction(sg) else num_scorers(self.cfg) * sg)
        return own + len(self.shared)

    def describe(self) -> str:
        r, t = self.cfg.rollout, self.cfg.trainer
        if self.layout["colocate"]:
            where = f"colocated: trainer and {r.num_workers} engine(s) share one GPU"
        elif self.layout["trainer_gpus"] == 0 and self.layout["rollout_gpus"] == 0:
            where = "trainer and engines on CPU"
        else:
            where = f"{t.num_workers} trainer rank(s) x {self.layout['trainer_gpus']:g} GPU, " \
                    f"{r.num_workers} engine(s) x {self.layout['rollout_gpus']:g} GPU"
        if self.shared and not self.layout["colocate"]:
            names = {"trainer": "trainer rank", "rollout": "engine"}
            where += " (" + "; ".join(f"GPU {d}: " + ", ".join(f"{names[role]} {k}" for role, k in actors)
                                      for d, actors in enumerate(self.shared)) + ")"
        return f"{where}; weight sync {self.layout['backend']}"

    def check_resources(self, cluster: dict, local: bool) -> None:
        """Fail fast, naming what is missing, when the cluster cannot host the actors."""
        need_cpu = cpus_needed(self.cfg)
        if need_cpu > cluster.get("CPU", 0):
            fix = "raise ray.num_cpus or unset it" if local else "add nodes"
            raise ConfigError(
                f"the actors need {need_cpu:g} CPUs (rollout.num_workers x rollout.num_cpus + trainer.num_workers x "
                f"trainer.num_cpus) but the Ray cluster has {cluster.get('CPU', 0):g}; lower "
                f"rollout.num_cpus/trainer.num_cpus or {fix}")
        need_gpu = self.gpus_needed()
        if need_gpu > cluster.get("GPU", 0):
            raise ConfigError(
                f"the actors need {need_gpu:g} GPUs (rollout.num_gpus, trainer.num_gpus; a GPU shared by fractions "
                f"counts as one) but the Ray cluster has {cluster.get('GPU', 0):g}; set them to 0 for CPU, lower "
                f"rollout.num_workers/trainer.num_workers or add GPU nodes")

    def reserve(self, timeout_s: float = 120.0) -> None:
        """Create the placement groups (an unsatisfiable request fails here, before any work)."""
        r, t = self.cfg.rollout, self.cfg.trainer
        tg, rg = self.layout["trainer_gpus"], self.layout["rollout_gpus"]
        try:
            if self.shared:
                cpus = {"trainer": t.num_cpus, "rollout": r.num_cpus, "scorer": self.cfg.rewards.model.num_cpus}
                bundles = [{"CPU": sum(cpus[role] for role, _ in actors), "GPU": 1} for actors in self.shared]
                pg = self._group(bundles, "the actors that share GPUs", timeout_s)
                for key, d in self.where.items():
                    self._strategies[key] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=d)
            if not _fraction(tg):
                pg = self._group([_bundle(t.num_cpus, tg)] * t.num_workers, f"{t.num_workers} trainer worker(s)",
                                 timeout_s)
                for k in range(t.num_workers):
                    self._strategies[("trainer", k)] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k)
            if not _fraction(rg):
                for i in range(r.num_workers):
                    pg = self._group([_bundle(r.num_cpus, rg)], f"rollout worker {i}", timeout_s)
                    self._strategies[("rollout", i)] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        except ConfigError:
            self.release()
            raise

    def _group(self, bundles: list[dict], who: str, timeout_s: float):
        pg = placement_group(bundles, strategy="STRICT_PACK" if len(bundles) == 1 else "PACK")
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise ConfigError(f"the Ray cluster could not place the {who} ({bundles[0]} each) within {timeout_s:g} s: "
                              f"no node has that much free at once; lower its num_cpus/num_gpus or add nodes") from None
        self.groups.append(pg)
        return pg

    def trainer(self, rank: int) -> dict:
        """Ray actor options of trainer rank `rank`."""
        return {"num_cpus": self.cfg.trainer.num_cpus, "num_gpus": self.layout["trainer_gpus"],
                "scheduling_strategy": self._strategies[("trainer", rank)]}

    def worker(self, index: int) -> dict:
        """Ray actor options of rollout worker `index`."""
        return {"num_cpus": self.cfg.rollout.num_cpus, "num_gpus": self.layout["rollout_gpus"],
                "scheduling_strategy": self._strategies[("rollout", index)]}

    def scorer(self, index: int) -> dict:
        """Ray actor options of reward-model scorer `index`: on a shared GPU's bundle when it takes a fraction."""
        m = self.cfg.rewards.model
        placed = self._strategies.get(("scorer", index))
        return {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus, **({"scheduling_strategy": placed} if placed else {})}

    def release(self) -> None:
        for pg in self.groups:
            remove_placement_group(pg)
        self.groups.clear()


def _bundle(num_cpus: float, num_gpus: float) -> dict:
    return {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}


def prepare(cfg) -> tuple[dict, Placement]:
    """Connect, resolve the automatic settings, check the rules that depend on them and that the
    cluster can host the actors; log what was chosen in one line. Nothing is reserved yet."""
    local = connect(cfg)
    cluster = ray.cluster_resources()
    chosen = resolve(cfg, cluster.get("GPU", 0))
    validate_resolved(cfg)
    lay = layout(cfg)
    placement = Placement(cfg, lay)
    auto = " ".join(f"{k}={_show(v)}" for k, v in chosen.items())
    log.info("Ray cluster: %g CPUs, %g GPUs -> %s | automatic: %s (each can be overridden)",
             cluster.get("CPU", 0), cluster.get("GPU", 0), placement.describe(), auto or "none")
    placement.check_resources(cluster, local)
    return lay, placement


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
