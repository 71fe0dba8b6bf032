"""The controller loop: build the actors from the config, train, publish, evaluate, account.

    run(cfg) -> summary dict

Rollout workers generate continuously; this loop only takes batches from the staleness
service, trains on them, and publishes the new weights (trainer/fleet.py: the publish protocol
of DESIGN.md section 6, and the rollout workers' liveness and recovery).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import ray
from omegaconf import OmegaConf
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from configs.schema import ConfigError, validate
from rewards.tasks import build_task, resolve_data_path
from rollout.episode import build_env, episode_metrics
from rollout.models import resolve_model_dir
from rollout.worker import RolloutWorker
from staleness.service import StalenessService
from trainer import checkpoint, cluster
from trainer.fleet import PING_TIMEOUT_S, Fleet
from trainer.invariance import effective_hparams
from trainer.monitor import Monitor, plot_run
from trainer.worker import TrainerWorker

log = logging.getLogger("tether")


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last finite weights was written."""


def start_trainer_group(trainers: list, on_gpu: bool) -> None:
    """Form the trainers' torch.distributed group when they shard with FSDP2 (several workers, or
    mixed precision on one GPU): every rank joins at once; then each shards and builds its optimizer."""
    if not ray.get(trainers[0].uses_group.remote()):
        return
    host, port = ray.get(trainers[0].sync_address.remote())
    ray.get([t.init_group.remote(host, port, "nccl" if on_gpu else "gloo") for t in trainers])


class Run:
    def __init__(self, cfg, model_dir: str, layout: dict, placement: cluster.Placement, task) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.layout = layout
        self.num_eval = len(task.eval)
        self.output_dir = Path(cfg.output_dir)
        r = cfg.rollout
        # actors are named after the run (its output directory): `ray.get_actor` finds them, and a
        # second run writing to the same directory fails here instead of mixing outputs
        self.run_id = str(self.output_dir.resolve())
        try:
            # on the driver's node: a lost worker node must not take the run's data state with it
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.service = ray.remote(StalenessService).options(
                num_cpus=0, name=f"tether:staleness:{self.run_id}", scheduling_strategy=here).remote(
                cfg.trainer.batch_size, cfg.staleness.max_staleness, cfg.staleness.max_running,
                len(task.train), cfg.seed, cfg.algorithm.drop_zero_variance_groups, cfg.staleness.fixed_lag,
            )
        except ValueError as e:  # the name is taken
            raise ConfigError(f"output_dir={cfg.output_dir!r} is being written by another run on this Ray cluster "
                              f"({e}); give this run its own output_dir") from None
        # an engine's GPUs (its tensor-parallel group) and CPUs are reserved together on one node,
        # shared GPUs as whole-GPU bundles; an unsatisfiable request fails here, before any work
        placement.reserve()
        self.placement = placement
        self.placement_groups = placement.groups
        self.trainers = self._new_trainers()
        self.trainer = self.trainers[0]  # rank 0: weight-sync root, writes checkpoints
        self.workers = [
            ray.remote(RolloutWorker).options(
                **placement.worker(i), max_concurrency=10_000, max_restarts=r.max_restarts,
                name=f"tether:rollout:{i}:{self.run_id}",
            ).remote(i, cfg, self.model_dir, self.service)
            for i in range(r.num_workers)
        ]
        self.fleet = Fleet(cfg, layout, self.trainers, self.workers, self.service)
        self.start_step = 0
        self.version = 0  # weight versions published
        self.evals: list[dict] = []
        self.consumed_tokens = 0
        self.max_lag = 0
        self.monitor: Monitor | None = None
        self.run_tokens = 0  # consumed tokens of this process's training (not of a resumed run's earlier steps)
        self.gen_before = 0  # the rollout workers' generated-token counters at the last step
        self.initial_service_state: dict = {}

    def _new_trainers(self) -> list:
        t = self.cfg.trainer
        return [ray.remote(TrainerWorker).options(**self.placement.trainer(k)).remote(self.cfg, self.model_dir, k,
                                                                                        t.num_workers)
                for k in range(t.num_workers)]

    def _all_trainers(self, method: str, *args):
        """Call a method on every trainer rank (they take part in the same collectives); rank 0's result."""
        return ray.get([getattr(t, method).remote(*args) for t in self.trainers])[0]

    # ---- a lost trainer, recovered in the run -------------------------------------------
    def _trainer_lost(self) -> bool:
        refs = [t.uses_group.remote() for t in self.trainers]
        try:
            ray.get(refs, timeout=PING_TIMEOUT_S)
            return False
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            return False  # alive but busy: not a loss, the original error stands

    def _recover_trainers(self, error: Exception, step: int) -> int:
        """A trainer rank died (its process or its node) during `step`. Stop generation, start a new
        trainer group (waiting for its resources), load the latest complete checkpoint (or the initial
        weights), roll the staleness service back to it, re-form the weight-sync group, publish and
        verify, and return the step to continue after."""
        cfg = self.cfg
        restarts = self.fleet.faults["trainer_restarts"] + 1
        if restarts > cfg.trainer.max_restarts:
            raise RuntimeError(f"a trainer worker was lost during step {step} ({str(error).splitlines()[0][:200]}) "
                               f"and trainer.max_restarts={cfg.trainer.max_restarts} restarts are used up; the run "
                               "stops. Resume it with checkpoint.resume=auto") from None
        log.warning("trainer lost during step %d (%s); restarting it in the run (%d of trainer.max_restarts=%d)",
                    step, str(error).splitlines()[0][:200], restarts, cfg.trainer.max_restarts)
        ray.get(self.service.pause.remote())
        ray.get(self.service.halt.remote())  # the loops waiting for admission end
        ray.get([w.stop.remote() for w in self.workers])  # in-flight requests aborted, their groups dropped
        for t in self.trainers:
            ray.kill(t)
        self.trainers = self._new_trainers()
        self.trainer = self.trainers[0]
        refs = [t.uses_group.remote() for t in self.trainers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=cfg.trainer.restart_timeout_s)
        if len(ready) < len(refs):
            raise RuntimeError(f"the trainer was lost during step {step} and its replacement found no resources "
                               f"within trainer.restart_timeout_s={cfg.trainer.restart_timeout_s:g} s (it needs "
                               f"trainer.num_cpus={cfg.trainer.num_cpus:g} and {self.layout['trainer_gpus']:g} GPU per "
                               "rank); the run stops. Resume it with checkpoint.resume=auto once the cluster has the "
                               "capacity") from None
        ray.get(refs)
        start_trainer_group(self.trainers, self.layout["trainer_gpus"] > 0)
        path = checkpoint.resolve("auto", self.output_dir) if cfg.checkpoint.enabled else None
        if path is not None:
            state = checkpoint.driver_state(path)
            ray.get([t.load.remote(str(path)) for t in self.trainers])
            back_to, service_state = state["step"], state["service"]
            self.evals, self.consumed_tokens, self.max_lag = state["evals"], state["consumed_tokens"], state["max_lag"]
        else:  # no checkpoint yet: the new trainer holds the initial weights, the service goes back to step 0
            back_to, service_state = 0, self.initial_service_state
            self.evals, self.consumed_tokens, self.max_lag = self.evals[:1], 0, 0
        ray.get(self.service.restore.remote(service_state))
        self.fleet.replace_trainers(self.trainers)
        self.fleet.init_weight_sync()
        self.fleet.publish_weights(back_to, verify=True)  # every engine == the restored trainer, bitwise
        self.version = back_to
        ray.get(self.service.set_version.remote(back_to))
        ray.get([w.end_publish.remote() for w in self.workers])
        ray.get(self.service.resume.remote())
        ray.get([w.run.remote() for w in self.workers])
        self.fleet.faults["trainer_restarts"] = restarts
        self.fleet.faults["steps_redone"] += step - 1 - back_to
        self.fleet.faults["recovery_publishes_verified"] += 1
        if self.monitor is not None:
            self.monitor.rewind(back_to)
        log.warning("trainer restarted from %s; continuing after step %d (%d finished step(s) to train again)",
                    path if path is not None else "the initial weights", back_to, step - 1 - back_to)
        return back_to

    def setup(self) -> None:
        self._check_shared_output()
        self.fleet.start_engines()
        start_trainer_group(self.trainers, self.layout["trainer_gpus"] > 0)
        self.fleet.init_weight_sync()  # the plan, the trainer's flat buffer, the weight-sync group

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

    def publish(self, version: int, save: bool = False) -> dict:
        """Version `version` to every engine (trainer/fleet.py); with `save`, a checkpoint written while
        admission is paused (`pub["checkpoint"]`; it counts once `commit_checkpoint` has run)."""
        pub = self.fleet.publish(version, checkpoint=(lambda: self.save_checkpoint(version)) if save else None)
        self.version = version
        return pub

    # ---- checkpoint, resume, export ---------------------------------------------------
    def save_checkpoint(self, step: int) -> tuple[Path, dict, float]:
        """Write the trainer state and the driver's (data cursor, counters) of step `step` into a
        temporary directory; `commit_checkpoint` makes it the latest complete checkpoint. The step's row
        goes into metrics.jsonl between the two, so a run stopped at any moment resumes from a step whose
        row was written: it never skips a row, and the rows after its checkpoint are rewritten."""
        t0 = time.perf_counter()
        tmp = checkpoint.begin(self.output_dir, step)
        self._all_trainers("save", str(tmp))
        # admission is paused: the service's state (data cursor, admitted rollouts) belongs to this version
        state = {"step": step, "service": ray.get(self.service.snapshot.remote())}
        return tmp, state, time.perf_counter() - t0

    def commit_checkpoint(self, written: tuple[Path, dict, float]) -> Path:
        """The driver's counters as they stand after the step (its tokens, lags and evaluation counted)."""
        t0 = time.perf_counter()
        tmp, state, write_s = written
        state = {**state, "evals": self.evals, "consumed_tokens": self.consumed_tokens, "max_lag": self.max_lag,
                 "wandb_run_id": self.monitor.run_id if self.monitor else None}
        path = checkpoint.commit(tmp, state["step"], state)
        checkpoint.prune(self.output_dir, self.cfg.checkpoint.keep_last)
        log.info("checkpoint after step %d: %s (%.1f s)", state["step"], path, write_s + time.perf_counter() - t0)
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
        self.initial_service_state = ray.get(self.service.snapshot.remote())  # a trainer lost before any checkpoint
        ray.get([w.run.remote() for w in self.workers])
        t_start = time.perf_counter()
        self.run_tokens = 0
        step = self.start_step + 1
        while step <= cfg.trainer.max_steps:
            try:
                self._train_step(step, monitor, t_start)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                # a dead rank, or a live rank whose collective broke with it
                if not self._trainer_lost():
                    raise
                step = self._recover_trainers(e, step)
            step += 1
        run_tokens = self.run_tokens
        train_time = time.perf_counter() - t_start
        self.fleet.check_workers(self.version)  # the final eval needs every engine
        ray.get(self.service.stop.remote())
        ray.get([w.stop.remote() for w in self.workers])
        self.evals.append(self.evaluate(cfg.trainer.max_steps))
        accounting = ray.get(self.service.accounting.remote())
        accounting["faults"] = dict(self.fleet.faults)
        if cfg.env is not None:  # environment failures (their groups are in dropped: error)
            stats = self.fleet.worker_stats(self.version)
            accounting.setdefault("episodes", {}).update({k: sum(s[k] for s in stats) for k in ("env_errors", "env_timeouts")})
        (self.output_dir / "accounting.json").write_text(json.dumps(accounting, indent=1))
        if not accounting["identity_holds"]:
            raise RuntimeError(f"trajectory accounting does not add up: {accounting}")
        (self.output_dir / "evals.json").write_text(json.dumps(self.evals, indent=1))
        plot_run(monitor.rows, self.evals, self.output_dir / "reward_staleness.png")
        exported = str(self.export()) if cfg.checkpoint.export_hf else None
        evals = self.evals
        return {
            "eval/reward_base": evals[0]["eval/reward"], "eval/reward_final": evals[-1]["eval/reward"],
            "eval/reward_best": max(e["eval/reward"] for e in evals), "steps": cfg.trainer.max_steps,
            "resumed_from_step": self.start_step,
            "perf/consumed_tokens_per_s": run_tokens / train_time if run_tokens else 0.0,
            "staleness/lag_max_seen": self.max_lag,
            "train_time_s": train_time, "accounting": accounting, "verified_publishes": self.fleet.verified_publishes,
            "exported_to": exported, "faults": dict(self.fleet.faults),
        }

    def _train_step(self, step: int, monitor: Monitor, t_start: float) -> None:
        """Take a batch, train, publish (checkpoint), log, evaluate."""
        cfg, ck = self.cfg, self.cfg.checkpoint
        t0 = time.perf_counter()
        batch = self.fleet.next_batch(self.version)
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
        self.run_tokens += tokens
        stats = self.fleet.worker_stats(self.version)
        gen_tokens = sum(s["generated_tokens"] for s in stats)
        acc = ray.get(self.service.accounting.remote())
        self.max_lag = max(self.max_lag, max(lags))
        row = {
            "step": step, "policy_version": step, **metrics,
            "staleness/lag_mean": sum(lags) / len(lags), "staleness/lag_min": min(lags),
            "staleness/lag_max": max(lags), "staleness/dropped": acc["dropped_total"],
            "rollout/tokens_per_s": max(gen_tokens - self.gen_before, 0) / step_s,  # a restart resets a worker's count
            "rollout/interrupted": pub["interrupted"],
            # responses whose tokens came from more than one policy version (interrupted by a publish)
            "rollout/multi_version_frac": sum(len(set(t.versions)) > 1 for t in trained) / len(trained),
            "reward/errors": sum(s["reward_errors"] for s in stats),
            **episode_metrics(trained),
            "faults/worker_restarts": self.fleet.faults["worker_restarts"],
            "faults/trainer_restarts": self.fleet.faults["trainer_restarts"],
            "time/step_s": step_s, "time/rollout_wait_s": t_wait, "time/weight_sync_s": pub["seconds"],
            "time/publish_idle_s": pub["idle_s"],  # admission paused: the engines wait for the new weights
            "weight_sync/bytes": pub["bytes"],
            "perf/consumed_tokens_per_s": tokens / step_s,
            "perf/consumed_tokens_per_s_cumulative": self.run_tokens / (time.perf_counter() - t_start),
        }
        self.gen_before = gen_tokens
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.trainer.max_steps:
            self.evals.append(self.evaluate(step))
            row["eval/reward"] = self.evals[-1]["eval/reward"]
        monitor.log(row)
        if pub["checkpoint"] is not None:
            self.commit_checkpoint(pub["checkpoint"])
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

    def close(self) -> None:
        """Let the engines shut down their processes (up to a minute in all), then kill every actor."""
        refs = [w.close.remote() for w in self.workers]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=60 if not self.fleet.hung else 5)
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
    if cfg.env is not None:
        try:
            build_env(cfg.env)  # likewise an environment whose constructor fails
        except Exception as e:
            raise ConfigError(f"env={OmegaConf.to_container(cfg.env)} could not be built ({type(e).__name__}: {e}); "
                              "fix its arguments") from None
    model_dir = str(resolve_model_dir(cfg.model.name, cfg.model.path, cfg.cache_dir))
    try:
        resume_from = checkpoint.resolve(cfg.checkpoint.resume, cfg.output_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    resume = checkpoint.driver_state(resume_from) if resume_from else None
    # connect, give the automatic settings their values for this cluster (logged in one line),
    # check the rules between them and that the cluster can host the actors
    layout, placement = cluster.prepare(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # the resolved values
    run_ = Run(cfg, model_dir, layout, placement, task)
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
