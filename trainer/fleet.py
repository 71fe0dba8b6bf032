"""Every actor of a run, and what happens when one dies (docs/design.md sections 6 and 9).

    fleet = Fleet(cfg, model_dir, layout, placement, num_prompts)   # the staleness service, trainers, workers
    fleet.setup(output_dir)                   # engines up, trainer group, weight-sync plan and group
    batch = fleet.next_batch(version)         # recovers lost rollout workers while waiting
    out = fleet.publish(version, checkpoint)  # pause admission -> weights -> version -> [checkpoint] -> resume
    back_to = fleet.recover_trainers(error, step, checkpoint_dir, service_state)
    fleet.close()

The fleet owns the staleness service (on the driver's node: a lost worker node must not take the
run's data state with it), the trainer ranks and the rollout workers, their placement, and the
fault counters (`faults`, in accounting.json and the metrics):

- **A rollout worker dies** (before or during a publish), or its engine dies under it (the actor is
  then killed for Ray to restart): Ray restarts it; its running rollouts are dropped as worker_lost
  and their prompts handed out again; a fresh weight-sync group is formed, and every engine receives
  the current version and is verified against the trainer before anything is generated again.
- **A rollout worker stops answering**: it is hung, not lost: the run stops, naming it.
- **A trainer rank dies**: generation halts, a new trainer group starts in the same placement
  (waiting for resources up to trainer.restart_timeout_s), loads the latest complete checkpoint (or
  the initial weights), the staleness service rolls back to it, the weight-sync group is formed
  again and a verified publish follows; the driver then trains the lost steps again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from configs.schema import ConfigError
from rewards.scorer import start_scorers
from rollout.worker import RolloutWorker
from staleness.service import StalenessService
from trainer import cluster
from trainer.publish import WeightSync, WeightSyncTimeout
from trainer.worker import TrainerWorker
from weight_sync.messages import GroupAddress

log = logging.getLogger("tether")

PING_TIMEOUT_S = 15.0  # a rollout worker that does not answer a ping this long is hung
RESTART_TIMEOUT_S = 600.0  # Ray restart plus engine start of a lost rollout worker


def start_trainer_group(trainers: list, on_gpu: bool, timeout_s: float) -> None:
    """Form the trainers' torch.distributed group when they shard with FSDP2 (several workers, or
    mixed precision on one GPU): every rank joins at once; then each shards and builds its optimizer."""
    if not ray.get(trainers[0].uses_group.remote()):
        return
    host, port = ray.get(trainers[0].sync_address.remote())
    address = GroupAddress(host, port, len(trainers), "nccl" if on_gpu else "gloo", timeout_s)
    ray.get([t.init_group.remote(address) for t in trainers])


class Fleet:
    def __init__(self, cfg, model_dir: str, layout: dict, placement: cluster.Placement, num_prompts: int) -> None:
        self.cfg, self.model_dir, self.layout, self.placement = cfg, model_dir, layout, placement
        r = cfg.rollout
        # actors are named after the run (its output directory): `ray.get_actor` finds them, and a
        # second run writing to the same directory fails here instead of mixing outputs
        self.run_id = str(Path(cfg.output_dir).resolve())
        try:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.service = ray.remote(StalenessService).options(
                num_cpus=0, name=f"tether:staleness:{self.run_id}", scheduling_strategy=here).remote(
                cfg.trainer.batch_size, cfg.staleness.max_staleness, cfg.staleness.max_running, num_prompts,
                cfg.seed, cfg.algorithm.drop_zero_variance_groups, cfg.staleness.fixed_lag)
        except ValueError as e:  # the name is taken
            raise ConfigError(f"output_dir={cfg.output_dir!r} is being written by another run on this Ray cluster "
                              f"({e}); give this run its own output_dir") from None
        # an engine's GPUs (its tensor-parallel group) and CPUs are reserved together on one node,
        # shared GPUs as whole-GPU bundles; an unsatisfiable request fails here, before any work
        placement.reserve()
        self.trainers = self._new_trainers()
        self.scorers = start_scorers(cfg, self.run_id, placement, cluster.num_scorers(cfg))  # rewards.model.path
        self.workers = [
            ray.remote(RolloutWorker).options(**placement.worker(i), max_concurrency=10_000,
                                              max_restarts=r.max_restarts, name=f"tether:rollout:{i}:{self.run_id}",
                                              ).remote(i, cfg, model_dir, self.service, self.scorers)
            for i in range(r.num_workers)
        ]
        self.incarnations: list[str] = []
        self.pids: list[int] = []
        self.sync = WeightSync(cfg, layout["backend"], self.trainers, self.workers, self._name)
        self.faults = {"worker_restarts": 0, "rollouts_dropped_worker_lost": 0, "recovery_publishes_verified": 0,
                       "engine_deaths": 0, "trainer_restarts": 0, "steps_redone": 0}

    def _new_trainers(self) -> list:
        """The trainer ranks, named `tether:trainer:<rank>.<generation>:<run>` (generation 0 at the start, one
        more after each in-run recovery: a name is free again only once Ray has reaped the old actor)."""
        t = self.cfg.trainer
        self.trainer_generation = getattr(self, "trainer_generation", -1) + 1
        return [ray.remote(TrainerWorker).options(**self.placement.trainer(k),
                                                  name=f"tether:trainer:{k}.{self.trainer_generation}:{self.run_id}"
                                                  ).remote(self.cfg, self.model_dir, k, t.num_workers)
                for k in range(t.num_workers)]

    def _name(self, i: int) -> str:
        return f"rollout worker {i} (pid {self.pids[i]})"

    @property
    def verified_publishes(self) -> int:
        return self.sync.verified

    @property
    def hung(self) -> bool:
        """A member stopped answering: do not wait on it at close."""
        return self.sync.hung

    # ---- setup -------------------------------------------------------------------------
    def setup(self, output_dir: Path) -> None:
        self._check_shared_output(Path(output_dir))
        ray.get([w.start.remote() for w in self.workers])  # engines up (vLLM: tens of seconds)
        infos = ray.get([w.ping.remote() for w in self.workers])
        self.incarnations, self.pids = [i["incarnation"] for i in infos], [i["pid"] for i in infos]
        start_trainer_group(self.trainers, self.layout["trainer_gpus"] > 0, self.cfg.weight_sync.timeout_s)
        self.sync.init()  # the plan, the trainer's flat buffer, the weight-sync group

    def _check_shared_output(self, output_dir: Path) -> None:
        """Trainer rank 0 writes checkpoints and the export into output_dir and the driver reads them (and
        writes its own files there): find out now, not at the first checkpoint, if they do not share it."""
        token = uuid.uuid4().hex
        probe = output_dir / f".probe-{token}"
        where = f"output_dir={str(output_dir)!r}"
        try:
            node = ray.get(self.trainers[0].probe_output_dir.remote(str(probe), token))
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
                   if not output_dir.is_absolute() else
                   "put output_dir on a filesystem every node mounts at the same path (NFS, a shared disk)")
            raise ConfigError(f"{where} is not shared: trainer rank 0 (node {node}) wrote a file there that this "
                              f"driver cannot read, so its checkpoints and export would be lost; {fix}")

    # ---- calls the driver makes ---------------------------------------------------------
    def all_trainers(self, method: str, *args):
        """Call a method on every trainer rank (they take part in the same collectives); rank 0's result."""
        return self.all_trainers_each(method, *args)[0]

    def all_trainers_each(self, method: str, *args) -> list:
        return ray.get([getattr(t, method).remote(*args) for t in self.trainers])

    def service_snapshot(self) -> dict:
        return ray.get(self.service.snapshot.remote())

    def restore_service(self, state: dict) -> None:
        ray.get(self.service.restore.remote(state))

    def dropped_total(self) -> int:
        return ray.get(self.service.accounting.remote())["dropped_total"]

    def scorer_seconds(self) -> float:
        """Seconds the reward-model scorers have spent scoring so far (0 without them; a restarted one starts at 0)."""
        try:
            return sum(s["seconds"] for s in ray.get([sc.get_stats.remote() for sc in self.scorers]))
        except ray.exceptions.RayActorError:
            return 0.0  # one is restarting: its share of this step is not counted

    def start_generation(self) -> None:
        ray.get([w.run.remote() for w in self.workers])

    def stop_generation(self) -> None:
        ray.get(self.service.stop.remote())
        ray.get([w.stop.remote() for w in self.workers])

    def next_batch(self, version: int) -> list:
        """The next batch; while waiting, lost rollout workers are found and recovered."""
        ref = self.service.get_batch.remote(self.cfg.trainer.batch_size)
        while not ray.wait([ref], timeout=2.0)[0]:
            self.check_workers(version)
        return ray.get(ref)

    def worker_stats(self, version: int) -> list[dict]:
        try:
            return ray.get([w.get_stats.remote() for w in self.workers])
        except ray.exceptions.RayActorError:
            self.check_workers(version)
            return ray.get([w.get_stats.remote() for w in self.workers])

    def accounting(self, version: int) -> dict:
        """The staleness service's accounting with the fault counters (and environment failures)."""
        acc = ray.get(self.service.accounting.remote())
        acc["faults"] = dict(self.faults)
        if self.cfg.env is not None:  # environment failures (their groups are in dropped: error)
            stats = self.worker_stats(version)
            acc.setdefault("episodes", {}).update({k: sum(s[k] for s in stats) for k in ("env_errors", "env_timeouts")})
        return acc

    # ---- publish, with recovery from lost rollout workers ------------------------------
    def publish(self, version: int, checkpoint: Callable[[], object] | None = None,
                lost: list[int] | None = None) -> dict:
        """Pause admission -> weights to every engine -> version -> [checkpoint] -> resume admission.

        Returns interrupted requests, bytes, `seconds` (the weight transfer: the slowest engine's
        receive, plus the trainer's fill when colocated), `idle_s` (admission paused: what a user
        feels) and `checkpoint` (what the checkpoint callable returned; None without one)."""
        t0 = time.perf_counter()
        ray.get(self.service.pause.remote())
        held = self.cfg.weight_sync.verify  # engines wait for the verification before generating
        if not lost:
            try:
                out = self._transfer(version, verify=held)
            except (ray.exceptions.RayError, WeightSyncTimeout) as e:
                try:
                    lost = self.lost_workers()
                except WeightSyncTimeout:
                    raise e from None  # the original error names the step that hung
                if not lost:
                    raise
                log.warning("publishing version %d failed (%s); rollout workers %s were lost", version,
                            str(e).splitlines()[0][:200], lost)
        if lost:
            out = self._recover_workers(lost, version)
            held = True
        ray.get(self.service.set_version.remote(version))
        saved = checkpoint() if checkpoint is not None else None  # admission is paused: the data cursor is consistent
        if held:
            try:
                ray.get([w.end_publish.remote() for w in self.workers])
            except ray.exceptions.RayActorError:  # died after loading the weights, before sampling again
                late = self.lost_workers()
                if not late:
                    raise
                self._recover_workers(late, version)
                ray.get([w.end_publish.remote() for w in self.workers])
                lost = sorted({*(lost or []), *late})
        ray.get(self.service.resume.remote())
        if lost:
            ray.get([self.workers[i].run.remote() for i in lost])  # generation resumes under verified weights
        return {**out, "idle_s": time.perf_counter() - t0, "checkpoint": saved}

    def _transfer(self, version: int, verify: bool) -> dict:
        if not self.cfg.rollout.interrupt_on_publish:
            # waiting for in-flight requests can take minutes: not inside the broadcast's timeout
            self.sync.let_requests_finish(version)
        return self.sync.transfer(version, verify)

    # ---- a lost rollout worker ----------------------------------------------------------
    def lost_workers(self) -> list[int]:
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
            self.sync.hung = True
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

    def _recover_workers(self, lost: list[int], version: int) -> dict:
        for i in lost:
            dropped = ray.get(self.service.worker_lost.remote(self.incarnations[i]))
            self.faults["rollouts_dropped_worker_lost"] += dropped
            log.warning("rollout worker %d lost: %d running rollouts dropped (worker_lost), prompts re-issued; "
                        "waiting for Ray to restart it", i, dropped)
        for i in lost:
            self._wait_restarted(i)
            self.faults["worker_restarts"] += 1  # counted now: a trainer lost meanwhile takes over the recovery
        ray.get([self.workers[i].start.remote() for i in lost])
        self.sync.init(restarted=lost)
        out = self._transfer(version, verify=True)  # every engine == trainer, bitwise; engines held
        self.faults["recovery_publishes_verified"] += 1
        log.warning("rollout workers %s restarted, re-joined the weight sync and verified at version %d", lost, version)
        return out

    def check_workers(self, version: int) -> None:
        """Recover now from any lost rollout worker (the current version, re-published)."""
        lost = self.lost_workers()
        if lost:
            self.publish(version, lost=lost)

    # ---- a lost trainer rank -----------------------------------------------------------
    def trainer_lost(self) -> bool:
        """Whether a trainer rank died (a live but busy one is not a loss: the original error stands)."""
        refs = [t.uses_group.remote() for t in self.trainers]
        try:
            ray.get(refs, timeout=PING_TIMEOUT_S)
            return False
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            return False

    def recover_trainers(self, error: Exception, step: int, checkpoint_dir: Path | None, service_state: dict) -> int:
        """A trainer rank died (its process or its node) during `step`. Stop generation, start a new
        trainer group (waiting for its resources), load `checkpoint_dir` (None: keep the initial weights),
        roll the staleness service back to `service_state`, re-form the weight-sync group, publish and
        verify. Returns the step the run continues after."""
        cfg = self.cfg
        restarts = self.faults["trainer_restarts"] + 1
        first_line = str(error).splitlines()[0][:200]
        if restarts > cfg.trainer.max_restarts:
            raise RuntimeError(f"a trainer worker was lost during step {step} ({first_line}) and trainer.max_restarts="
                               f"{cfg.trainer.max_restarts} restarts are used up; the run stops. Resume it with "
                               "checkpoint.resume=auto") from None
        log.warning("trainer lost during step %d (%s); restarting it in the run (%d of trainer.max_restarts=%d)",
                    step, first_line, restarts, cfg.trainer.max_restarts)
        ray.get(self.service.pause.remote())
        ray.get(self.service.halt.remote())  # the loops waiting for admission end
        ray.get([w.stop.remote() for w in self.workers])  # in-flight requests aborted, their groups dropped
        for t in self.trainers:
            ray.kill(t)
        self.trainers = self._new_trainers()
        refs = [t.uses_group.remote() for t in self.trainers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=cfg.trainer.restart_timeout_s)
        if len(ready) < len(refs):
            raise RuntimeError(f"the trainer was lost during step {step} and its replacement found no resources "
                               f"within trainer.restart_timeout_s={cfg.trainer.restart_timeout_s:g} s (it needs "
                               f"trainer.num_cpus={cfg.trainer.num_cpus:g} and {self.layout['trainer_gpus']:g} GPU per "
                               "rank); the run stops. Resume it with checkpoint.resume=auto once the cluster has the "
                               "capacity") from None
        ray.get(refs)
        start_trainer_group(self.trainers, self.layout["trainer_gpus"] > 0, cfg.weight_sync.timeout_s)
        back_to = self.all_trainers("load", str(checkpoint_dir)) if checkpoint_dir is not None else 0
        self.restore_service(service_state)
        self.sync.replace_trainers(self.trainers)
        self.sync.init()
        self._transfer(back_to, verify=True)  # every engine == the restored trainer, bitwise
        ray.get(self.service.set_version.remote(back_to))
        ray.get([w.end_publish.remote() for w in self.workers])
        ray.get(self.service.resume.remote())
        self.start_generation()
        self.faults["trainer_restarts"] = restarts
        self.faults["steps_redone"] += step - 1 - back_to
        self.faults["recovery_publishes_verified"] += 1
        log.warning("trainer restarted from %s; continuing after step %d (%d finished step(s) to train again)",
                    checkpoint_dir if checkpoint_dir is not None else "the initial weights", back_to, step - 1 - back_to)
        return back_to

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
        for actor in [*self.workers, *self.trainers, *self.scorers, self.service]:
            ray.kill(actor)
        for pg in self.placement.groups:
            remove_placement_group(pg)
