"""The controller loop: build the actors from the config, train, publish, evaluate, account.

    run(cfg) -> summary dict

Rollout workers generate continuously; this loop only takes batches from the staleness
service, trains on them, and publishes the new weights with the protocol of DESIGN.md
section 6: pause admission -> abort in-flight requests -> broadcast -> version i+1 -> resume.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import ray
from omegaconf import OmegaConf
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from configs.schema import ConfigError, validate
from rewards.tasks import build_task, resolve_data_path
from rollout.models import resolve_model_dir
from rollout.worker import RolloutWorker
from staleness.service import StalenessService
from trainer import checkpoint
from trainer.invariance import effective_hparams
from trainer.monitor import Monitor, plot_run
from trainer.worker import TrainerWorker

log = logging.getLogger("tether")


PING_TIMEOUT_S = 15.0  # a rollout worker that does not answer a ping this long is hung
RESTART_TIMEOUT_S = 600.0  # Ray restart plus engine start of a lost rollout worker


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last finite weights was written."""


class WeightSyncTimeout(RuntimeError):
    """A member of the weight-sync protocol did not answer within weight_sync.timeout_s."""


def _connect_ray(cfg) -> None:
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        # dashboard bound to loopback: a local run exposes nothing to the network
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", runtime_env=env)


def _layout(cfg) -> dict:
    """GPUs per actor and the weight-sync backend.

    Disaggregated (default with 2+ GPUs): the configured rollout.num_gpus / trainer.num_gpus,
    NCCL between them. Colocated (rollout.colocate=true, or unset on a 1-GPU cluster with GPUs
    requested): trainer and engines share one GPU — the trainer takes half of it and the R
    engines the other half between them (each engine's memory is rollout.gpu_memory_utilization),
    and weights move by CUDA IPC handles.
    """
    r, t = cfg.rollout, cfg.trainer
    gpus = ray.cluster_resources().get("GPU", 0)
    colocate = r.colocate
    if colocate is None:
        colocate = gpus == 1 and r.num_gpus > 0 and t.num_gpus > 0
    backend = cfg.weight_sync.backend
    if colocate:
        rollout_gpus, trainer_gpus = 0.5 / r.num_workers, 0.5
        if backend == "auto":
            backend = "ipc"
        log.info("colocated layout: trainer and %d engine(s) share one GPU; weight sync by %s", r.num_workers, backend)
    else:
        rollout_gpus, trainer_gpus = r.num_gpus, t.num_gpus
        if backend == "auto":
            backend = "nccl" if rollout_gpus > 0 and trainer_gpus > 0 else "gloo"
    if backend == "ipc" and not colocate:
        raise ConfigError("weight_sync.backend=ipc needs the colocated layout (rollout.colocate=true)")
    return {"colocate": colocate, "rollout_gpus": rollout_gpus, "trainer_gpus": trainer_gpus, "backend": backend}


def _check_resources(cfg, layout: dict) -> None:
    """Fail fast, naming what is missing, when the cluster cannot host the actors."""
    total = ray.cluster_resources()
    need_cpu = cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.trainer.num_workers * cfg.trainer.num_cpus
    need_gpu = cfg.rollout.num_workers * layout["rollout_gpus"] + cfg.trainer.num_workers * layout["trainer_gpus"]
    if need_cpu > total.get("CPU", 0):
        raise ConfigError(
            f"the actors need {need_cpu:g} CPUs (rollout.num_workers x rollout.num_cpus + trainer.num_cpus) but the "
            f"Ray cluster has {total.get('CPU', 0):g}; lower rollout.num_cpus/trainer.num_cpus or add nodes"
        )
    if need_gpu > total.get("GPU", 0):
        raise ConfigError(
            f"the actors need {need_gpu:g} GPUs (rollout.num_gpus, trainer.num_gpus) but the Ray cluster has "
            f"{total.get('GPU', 0):g}; set them to 0 for CPU or add GPU nodes"
        )


def _reserve(num_cpus: float, num_gpus: float, who: str, timeout_s: float = 120.0, count: int = 1):
    """One placement group of `count` bundles (one per actor), packed onto as few nodes as possible."""
    bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
    pg = placement_group([bundle] * count, strategy="STRICT_PACK" if count == 1 else "PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ConfigError(f"the Ray cluster could not place the {who} ({bundle}) within {timeout_s:g} s: no node has "
                          f"that much free at once; lower its num_cpus/num_gpus or add nodes") from None
    return pg


def start_trainer_group(trainers: list, on_gpu: bool) -> None:
    """Form the trainers' torch.distributed group when they shard with FSDP2 (several workers, or
    mixed precision on one GPU): every rank joins at once; then each shards and builds its optimizer."""
    if not ray.get(trainers[0].uses_group.remote()):
        return
    host, port = ray.get(trainers[0].sync_address.remote())
    ray.get([t.init_group.remote(host, port, "nccl" if on_gpu else "gloo") for t in trainers])


class Run:
    def __init__(self, cfg, model_dir: str, layout: dict, task) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.layout = layout
        self.verified_publishes = 0
        self.num_eval = len(task.eval)
        self.output_dir = Path(cfg.output_dir)
        r = cfg.rollout
        # actors are named after the run (its output directory): `ray.get_actor` finds them, and a
        # second run writing to the same directory fails here instead of mixing outputs
        self.run_id = str(self.output_dir.resolve())
        try:
            self.service = ray.remote(StalenessService).options(num_cpus=0, name=f"tether:staleness:{self.run_id}").remote(
                cfg.trainer.batch_size, cfg.staleness.max_staleness, cfg.staleness.max_running,
                len(task.train), cfg.seed, cfg.algorithm.drop_zero_variance_groups, cfg.staleness.fixed_lag,
            )
        except ValueError as e:  # the name is taken
            raise ConfigError(f"output_dir={cfg.output_dir!r} is being written by another run on this Ray cluster "
                              f"({e}); give this run its own output_dir") from None
        # one placement group per actor: an engine's GPUs (its tensor-parallel group) and CPUs are
        # reserved together on one node, and an unsatisfiable request fails here, before any work
        t = cfg.trainer
        trainer_pg = _reserve(t.num_cpus, layout["trainer_gpus"], f"{t.num_workers} trainer worker(s)", count=t.num_workers)
        worker_pgs = [_reserve(r.num_cpus, layout["rollout_gpus"], f"rollout worker {i}") for i in range(r.num_workers)]
        self.placement_groups = [trainer_pg, *worker_pgs]
        self.trainers = [
            ray.remote(TrainerWorker).options(
                num_cpus=t.num_cpus, num_gpus=layout["trainer_gpus"],
                scheduling_strategy=PlacementGroupSchedulingStrategy(trainer_pg, placement_group_bundle_index=k),
            ).remote(cfg, self.model_dir, k, t.num_workers)
            for k in range(t.num_workers)
        ]
        self.trainer = self.trainers[0]  # rank 0: weight-sync root, writes checkpoints
        self.workers = [
            ray.remote(RolloutWorker).options(
                num_cpus=r.num_cpus, num_gpus=layout["rollout_gpus"], max_concurrency=10_000,
                max_restarts=r.max_restarts, name=f"tether:rollout:{i}:{self.run_id}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            ).remote(i, cfg, self.model_dir, self.service)
            for i, pg in enumerate(worker_pgs)
        ]
        self.start_step = 0
        self.version = 0  # weight versions published
        self.hung = False  # a worker stopped answering: do not wait on it at close
        self.incarnations: list[str] = []
        self.pids: list[int] = []
        self.faults = {"worker_restarts": 0, "rollouts_dropped_worker_lost": 0, "recovery_publishes_verified": 0,
                       "engine_deaths": 0}
        self.evals: list[dict] = []
        self.consumed_tokens = 0
        self.max_lag = 0
        self.monitor: Monitor | None = None

    def _all_trainers(self, method: str, *args):
        """Call a method on every trainer rank (they take part in the same collectives); rank 0's result."""
        return ray.get([getattr(t, method).remote(*args) for t in self.trainers])[0]

    def setup(self) -> None:
        cfg = self.cfg
        self._check_shared_output()
        ray.get([w.start.remote() for w in self.workers])  # engines up (vLLM: tens of seconds)
        infos = ray.get([w.ping.remote() for w in self.workers])
        self.incarnations, self.pids = [i["incarnation"] for i in infos], [i["pid"] for i in infos]
        start_trainer_group(self.trainers, self.layout["trainer_gpus"] > 0)
        self.metas = ray.get(self.trainer.param_metas.remote())
        self._init_weight_sync()

    def _check_shared_output(self) -> None:
        """Trainer rank 0 writes checkpoints and the export into output_dir and the driver reads them (and
        writes its own files there): find out now, not at the first checkpoint, if they do not share it."""
        token = uuid.uuid4().hex
        probe = self.output_dir / f".probe-{token}"
        where = f"output_dir={str(self.output_dir)!r}"
        try:
            node = ray.get(self.trainer.probe_output_dir.remote(str(probe), token))
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, OSError) else None
            if cause is None:
                raise
            raise ConfigError(f"trainer rank 0 cannot write to {where} ({type(cause).__name__}: {cause.strerror}); "
                              "checkpoints and the export are written there: make it writable on the trainer's "
                              "node or choose another output_dir") from None
        try:
            seen = probe.read_text()
            probe.unlink()
        except OSError:
            seen = None
        if seen != token:
            fix = ("give an absolute path (actors do not run in the driver's working directory)"
                   if not self.output_dir.is_absolute() else
                   "put output_dir on a filesystem every node mounts at the same path (NFS, a shared disk)")
            raise ConfigError(f"{where} is not shared: trainer rank 0 (node {node}) wrote a file there that this "
                              f"driver cannot read, so its checkpoints and export would be lost; {fix}")

    def _init_weight_sync(self) -> None:
        """A fresh weight-sync group: trainer rank 0 and every engine (also after a worker restart)."""
        backend = self.layout["backend"]
        if backend == "ipc":
            return  # no process group: handles travel through Ray
        tp = self.cfg.rollout.tensor_parallel_size
        world = 1 + tp * len(self.workers)
        host, port = ray.get(self.trainer.sync_address.remote())
        timeout = self.cfg.weight_sync.timeout_s
        # every member must join at once: the group forms only when all world_size ranks arrived
        self._await([("trainer rank 0", self.trainer.init_weight_sync.remote(host, port, world, backend, timeout))]
                    + [(self._name(i), w.init_weight_sync.remote(host, port, 1 + tp * i, world, backend, timeout))
                       for i, w in enumerate(self.workers)], "joining the weight-sync group")

    def _name(self, i: int) -> str:
        return f"rollout worker {i} (pid {self.pids[i]})"

    def _await(self, calls: list[tuple[str, ray.ObjectRef]], what: str) -> list:
        """ray.get of every call, within weight_sync.timeout_s; a timeout names who did not answer."""
        timeout = self.cfg.weight_sync.timeout_s
        refs = [ref for _, ref in calls]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            self.hung = True
            stuck = [name for name, ref in calls if ref in pending]
            raise WeightSyncTimeout(
                f"{what}: {', '.join(stuck)} did not answer within weight_sync.timeout_s={timeout:g} s. Look at "
                f"that process's log (a hung collective, a stopped process, an exhausted GPU); raise "
                f"weight_sync.timeout_s if the transfer is just slow")
        return ray.get(refs)

    # ---- publish, with recovery from lost rollout workers ------------------------------
    def publish(self, version: int, save: bool = False, lost: list[int] | None = None) -> dict:
        """Pause admission -> abort/await in-flight -> broadcast -> version -> [checkpoint] -> resume.

        If a rollout worker died (before or during the broadcast), Ray restarts it; its running
        rollouts are dropped as worker_lost (their prompts handed out again), a fresh weight-sync
        group is formed, and every engine receives this version and is verified against the
        trainer before anything is generated again."""
        ray.get(self.service.pause.remote())
        if not lost:
            try:
                interrupted, out = self._publish_weights(version)
            except (ray.exceptions.RayError, WeightSyncTimeout) as e:
                try:
                    lost = self._lost_workers()
                except WeightSyncTimeout:
                    raise e from None  # the original error names the step that hung
                if not lost:
                    raise
                log.warning("publishing version %d failed (%s); rollout workers %s were lost", version,
                            str(e).splitlines()[0][:200], lost)
        if lost:
            interrupted, out = self._recover(lost, version)
        ray.get(self.service.set_version.remote(version))
        self.version = version
        if save:  # admission is paused: the data cursor and counters are consistent
            self.save_checkpoint(version)
        try:
            ray.get([w.end_publish.remote() for w in self.workers])
        except ray.exceptions.RayActorError:  # died after loading the weights, before sampling again
            late = self._lost_workers()
            if not late:
                raise
            self._recover(late, version)
            ray.get([w.end_publish.remote() for w in self.workers])
            lost = sorted({*(lost or []), *late})
        ray.get(self.service.resume.remote())
        if lost:
            ray.get([self.workers[i].run.remote() for i in lost])  # generation resumes under verified weights
        return {"interrupted": interrupted, **out}

    def _publish_weights(self, version: int, verify: bool = False) -> tuple[int, dict]:
        interrupted = sum(self._await([(self._name(i), w.begin_publish.remote()) for i, w in enumerate(self.workers)],
                                      f"pausing generation for version {version}"))
        bucket = self.cfg.weight_sync.bucket_mb << 20
        what = f"weight sync of version {version}"
        if self.layout["backend"] == "ipc":
            t0 = time.perf_counter()
            packed = self._all_trainers("publish_ipc")
            # every engine loads from the trainer's buffers; then they are freed
            self._await([(self._name(i), w.receive_weights_ipc.remote(packed["handles"], self.metas, bucket, version))
                         for i, w in enumerate(self.workers)], what)
            ray.get(self.trainer.release_ipc.remote())
            out = {"bytes": packed["bytes"], "seconds": time.perf_counter() - t0}
        else:
            # returns once the trainer sent every bucket and every engine loaded it
            out = self._await([(f"trainer rank {k}", t.publish.remote()) for k, t in enumerate(self.trainers)]
                              + [(self._name(i), w.receive_weights.remote(self.metas, bucket, version))
                                 for i, w in enumerate(self.workers)], what)[0]
        if self.cfg.weight_sync.verify or verify:
            self.verify_weights(version)
        return interrupted, out

    def _lost_workers(self) -> list[int]:
        """Rollout workers that died or were restarted by Ray since we last set them up, or whose engine
        died under a live actor (those are killed here, for Ray to restart). A worker that does not
        answer at all is hung, not lost: that stops the run, naming it."""
        refs = [w.ping.remote() for w in self.workers]  # all at once: one timeout for every worker
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=PING_TIMEOUT_S)
        lost, hung = [], []
        for i, ref in enumerate(refs):
            if ref in pending:
                hung.append(self._name(i))
                continue
            try:
                info = ray.get(ref)
            except ray.exceptions.RayActorError:
                lost.append(i)
                continue
            if info["engine_dead"]:
                # the actor lives on, so Ray would never restart it: kill it (restart allowed) and recover as
                # for any lost worker
                log.warning("%s: %s; killing the actor so that Ray restarts it", self._name(i), info["engine_dead"])
                ray.kill(self.workers[i], no_restart=False)
                self.faults["engine_deaths"] += 1
                lost.append(i)
            elif info["incarnation"] != self.incarnations[i]:
                lost.append(i)
        if hung:
            self.hung = True
            raise WeightSyncTimeout(f"{', '.join(hung)} did not answer a ping within {PING_TIMEOUT_S:g} s: the process "
                                    "is alive but stuck (stopped, deadlocked or swapping); look at its log")
        return lost

    def _wait_restarted(self, i: int) -> None:
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                info = ray.get(self.workers[i].ping.remote(), timeout=PING_TIMEOUT_S)
                if info["incarnation"] != self.incarnations[i]:
                    self.incarnations[i], self.pids[i] = info["incarnation"], info["pid"]
                    return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"rollout worker {i} died and Ray did not bring it back within {RESTART_TIMEOUT_S:g} s "
                           f"(rollout.max_restarts={self.cfg.rollout.max_restarts} may be used up); the run stops. "
                           f"Resume it with checkpoint.resume=auto")

    def _recover(self, lost: list[int], version: int) -> tuple[int, dict]:
        for i in lost:
            dropped = ray.get(self.service.worker_lost.remote(self.incarnations[i]))
            self.faults["rollouts_dropped_worker_lost"] += dropped
            log.warning("rollout worker %d lost: %d running rollouts dropped (worker_lost), prompts re-issued; "
                        "waiting for Ray to restart it", i, dropped)
        for i in lost:
            self._wait_restarted(i)
        ray.get([self.workers[i].start.remote() for i in lost])
        self._init_weight_sync()
        interrupted, out = self._publish_weights(version, verify=True)  # every engine == trainer, bitwise
        self.faults["worker_restarts"] += len(lost)
        self.faults["recovery_publishes_verified"] += 1
        log.warning("rollout workers %s restarted, re-joined the weight-sync group and verified at version %d",
                    lost, version)
        return interrupted, out

    def _check_workers(self) -> None:
        """Recover now from any lost rollout worker (the current version, re-published)."""
        lost = self._lost_workers()
        if lost:
            self.publish(self.version, lost=lost)

    def _next_batch(self) -> list:
        """The next batch; while waiting, lost rollout workers are found and recovered."""
        ref = self.service.get_batch.remote(self.cfg.trainer.batch_size)
        while not ray.wait([ref], timeout=2.0)[0]:
            self._check_workers()
        return ray.get(ref)

    def _worker_stats(self) -> list[dict]:
        try:
            return ray.get([w.get_stats.remote() for w in self.workers])
        except ray.exceptions.RayActorError:
            self._check_workers()
            return ray.get([w.get_stats.remote() for w in self.workers])

    def verify_weights(self, version: int) -> None:
        """Every engine must serve exactly the trainer's weights (bitwise, in the engine's dtype)."""
        expected = self._all_trainers("fingerprint")
        got = ray.get([w.fingerprint.remote() for w in self.workers])
        bad = [i for i, f in enumerate(got) if f != expected]
        if bad:
            raise RuntimeError(f"after publishing version {version}, rollout workers {bad} hold weights whose "
                               f"fingerprint differs from the trainer's ({[got[i] for i in bad]} != {expected})")
        self.verified_publishes += 1

    # ---- checkpoint, resume, export ---------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        t0 = time.perf_counter()
        tmp = checkpoint.begin(self.output_dir, step)
        self._all_trainers("save", str(tmp))
        state = {"step": step, "service": ray.get(self.service.snapshot.remote()), "evals": self.evals,
                 "consumed_tokens": self.consumed_tokens, "max_lag": self.max_lag,
                 "wandb_run_id": self.monitor.run_id if self.monitor else None}
        path = checkpoint.commit(tmp, step, state)
        checkpoint.prune(self.output_dir, self.cfg.checkpoint.keep_last)
        log.info("checkpoint after step %d: %s (%.1f s)", step, path, time.perf_counter() - t0)
        return path

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: trainer state on every rank, the data cursor and counters, then
        the restored weights to every engine (version = the checkpoint's step) before any sample."""
        state = checkpoint.driver_state(path)
        steps = set(ray.get([t.load.remote(str(path)) for t in self.trainers]))
        if steps != {state["step"]}:
            raise RuntimeError(f"checkpoint {path}: trainer state is at step(s) {steps}, driver state at {state['step']}")
        ray.get(self.service.restore.remote(state["service"]))
        self.start_step, self.evals = state["step"], state["evals"]
        self.consumed_tokens, self.max_lag = state["consumed_tokens"], state["max_lag"]
        self.publish(self.start_step)  # the restored weights, to every engine, before any sample
        log.info("resumed from %s: next step %d", path, self.start_step + 1)

    def export(self) -> Path:
        out = self.output_dir / "hf"
        self._all_trainers("export_hf", str(out), self.model_dir)
        log.info("final policy exported to %s", out)
        return out

    def evaluate(self, step: int) -> dict:
        n = self.num_eval
        shards = [list(range(i, n, len(self.workers))) for i in range(len(self.workers))]
        results = [r for rs in ray.get([w.evaluate.remote(s, self.cfg.eval.max_new_tokens)
                                        for w, s in zip(self.workers, shards) if s]) for r in rs]
        results.sort(key=lambda r: r["index"])
        reward = sum(r["reward"] for r in results) / len(results)
        return {"step": step, "eval/reward": reward, "samples": results[:4]}

    def train(self, monitor: Monitor) -> dict:
        cfg = self.cfg
        hp = effective_hparams(cfg)
        if cfg.batch_invariance.reference_batch_size is not None:
            log.info("batch-size invariance: B_ref=%d, B=%d, c=%.4g per optimizer update, %.4g per step -> lr %.4g, "
                     "adam betas (%.6g, %.6g), EWMA decay %.6g (centre of mass %.3g updates), advantage-norm span %s",
                     cfg.batch_invariance.reference_batch_size, cfg.trainer.batch_size, hp["c"], hp["c_batch"], hp["lr"],
                     *hp["adam_betas"], hp["ewma_decay"], hp["ewma_center_of_mass_steps"], hp["adv_norm_span"])
        if cfg.algorithm.proximal == "ewma":
            log.info("EWMA proximal policy: decay %.6g, centre of mass %.3g optimizer steps",
                     hp["ewma_decay"], hp["ewma_center_of_mass_steps"])
        if not self.evals:
            self.evals = [self.evaluate(0)]
            log.info("eval before training: reward %.3f", self.evals[0]["eval/reward"])
        ray.get([w.run.remote() for w in self.workers])
        t_start = time.perf_counter()
        run_tokens = 0
        gen_before = 0
        ck = cfg.checkpoint
        for step in range(self.start_step + 1, cfg.trainer.max_steps + 1):
            t0 = time.perf_counter()
            batch = self._next_batch()
            t_wait = time.perf_counter() - t0
            version = step - 1  # weights the batch is trained from
            trained = [t for t in batch if not t.is_baseline]  # ReMax baselines are not trained on
            lags = [version - t.start_version for t in trained]
            batch_ref = ray.put(batch)  # one copy in the object store, read by every trainer rank
            metrics = self._all_trainers("train_step", batch_ref)
            give_up = metrics["train/skipped_in_a_row"] >= cfg.trainer.max_skipped_steps
            save = ck.enabled and (give_up or step == cfg.trainer.max_steps
                                   or bool(ck.every_steps and step % ck.every_steps == 0))
            pub = self.publish(step, save=save)
            step_s = time.perf_counter() - t0
            tokens = sum(t.num_tokens for t in trained)
            self.consumed_tokens += tokens
            run_tokens += tokens
            stats = self._worker_stats()
            gen_tokens = sum(s["generated_tokens"] for s in stats)
            acc = ray.get(self.service.accounting.remote())
            self.max_lag = max(self.max_lag, max(lags))
            row = {
                "step": step, "policy_version": step, **metrics,
                "staleness/lag_mean": sum(lags) / len(lags), "staleness/lag_min": min(lags),
                "staleness/lag_max": max(lags), "staleness/dropped": acc["dropped_total"],
                "rollout/tokens_per_s": max(gen_tokens - gen_before, 0) / step_s,  # a restart resets a worker's count
                "rollout/interrupted": pub["interrupted"],
                # responses whose tokens came from more than one policy version (interrupted by a publish)
                "rollout/multi_version_frac": sum(len(set(t.versions)) > 1 for t in trained) / len(trained),
                "reward/errors": sum(s["reward_errors"] for s in stats),
                "faults/worker_restarts": self.faults["worker_restarts"],
                "time/step_s": step_s, "time/rollout_wait_s": t_wait, "time/weight_sync_s": pub["seconds"],
                "weight_sync/bytes": pub["bytes"],
                "perf/consumed_tokens_per_s": tokens / step_s,
                "perf/consumed_tokens_per_s_cumulative": run_tokens / (time.perf_counter() - t_start),
            }
            gen_before = gen_tokens
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.trainer.max_steps:
                self.evals.append(self.evaluate(step))
                row["eval/reward"] = self.evals[-1]["eval/reward"]
            monitor.log(row)
            if cfg.logger.sample_every and step % cfg.logger.sample_every == 0:
                monitor.samples(step, [{"prompt_index": t.prompt_index, "response": t.info.get("text", ""),
                                        "reward": t.reward, "versions": f"{min(t.versions, default=step - 1)}"
                                        f"-{max(t.versions, default=step - 1)}"} for t in trained[:8]])
            if give_up:
                raise TrainingDiverged(
                    f"{metrics['train/skipped_in_a_row']} optimizer steps in a row had a non-finite loss or gradient "
                    f"(trainer.max_skipped_steps={cfg.trainer.max_skipped_steps}); stopped after step {step}. "
                    + (f"The checkpoint in {checkpoint.root(self.output_dir)} holds the last finite weights: " if save
                       else "No checkpoint was written (checkpoint.enabled=false): ")
                    + "lower trainer.lr or raise trainer.grad_clip, then resume with checkpoint.resume=auto")
        train_time = time.perf_counter() - t_start
        self._check_workers()  # the final eval needs every engine
        ray.get(self.service.stop.remote())
        ray.get([w.stop.remote() for w in self.workers])
        self.evals.append(self.evaluate(cfg.trainer.max_steps))
        accounting = ray.get(self.service.accounting.remote())
        accounting["faults"] = dict(self.faults)
        (self.output_dir / "accounting.json").write_text(json.dumps(accounting, indent=1))
        if not accounting["identity_holds"]:
            raise RuntimeError(f"trajectory accounting does not add up: {accounting}")
        (self.output_dir / "evals.json").write_text(json.dumps(self.evals, indent=1))
        plot_run(monitor.rows, self.evals, self.output_dir / "reward_staleness.png")
        exported = str(self.export()) if ck.export_hf else None
        evals = self.evals
        return {
            "eval/reward_base": evals[0]["eval/reward"], "eval/reward_final": evals[-1]["eval/reward"],
            "eval/reward_best": max(e["eval/reward"] for e in evals), "steps": cfg.trainer.max_steps,
            "resumed_from_step": self.start_step,
            "perf/consumed_tokens_per_s": run_tokens / train_time if run_tokens else 0.0,
            "staleness/lag_max_seen": self.max_lag,
            "train_time_s": train_time, "accounting": accounting, "verified_publishes": self.verified_publishes,
            "exported_to": exported, "faults": dict(self.faults),
        }

    def close(self) -> None:
        """Let the engines shut down their processes (up to a minute in all), then kill every actor."""
        refs = [w.close.remote() for w in self.workers]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=60 if not self.hung else 5)
        for ref in done:
            try:
                ray.get(ref)
            except Exception:  # a dead worker has nothing left to close
                log.debug("worker close failed", exc_info=True)
        if pending:
            log.warning("%d rollout worker(s) did not close in time; killing them", len(pending))
        for actor in [*self.workers, *self.trainers, self.service]:
            ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)


def run(cfg) -> dict:
    """Validate, connect, build, train, summarise. Raises ConfigError for bad input."""
    validate(cfg)
    # actors may run in another working directory (or on another node): absolute paths only
    cfg.task.path = resolve_data_path(cfg.task.path)
    cfg.task.eval_path = resolve_data_path(cfg.task.eval_path)
    try:
        effective_hparams(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    task = build_task(cfg.task)  # a task that cannot be built is a config error, before any actor starts
    model_dir = str(resolve_model_dir(cfg.model.name, cfg.model.path, cfg.cache_dir))
    try:
        resume_from = checkpoint.resolve(cfg.checkpoint.resume, cfg.output_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    resume = checkpoint.driver_state(resume_from) if resume_from else None
    _connect_ray(cfg)
    layout = _layout(cfg)
    _check_resources(cfg, layout)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    run_ = Run(cfg, model_dir, layout, task)
    monitor = Monitor(cfg, output_dir, resolved, resume=resume)
    run_.monitor = monitor
    try:
        run_.setup()
        if resume_from:
            run_.restore(resume_from)
        summary = run_.train(monitor)
        monitor.summary({k: v for k, v in summary.items() if k != "accounting"})
        return summary
    finally:
        monitor.close()
        run_.close()
