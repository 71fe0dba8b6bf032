"""The rollout fleet as the driver sees it: liveness, restarts, and the weight-sync protocol.

    fleet = Fleet(cfg, layout, trainers, workers, service)
    fleet.start_engines(); fleet.init_weight_sync()      # setup: the engines, the plan, the group
    batch = fleet.next_batch()                           # recovers lost rollout workers while waiting
    out = fleet.publish(version, checkpoint=None)        # DESIGN.md section 6

A publish: pause admission -> one call per engine (pause its requests, receive, set the version,
resume) beside the trainer's fill-and-broadcast -> version i+1 -> [checkpoint] -> resume
admission. Colocated (CUDA IPC), the trainer fills its flat buffer first, while the engines still
generate, and each engine then copies out of it. With weight_sync.verify the engines hold their
requests until every fingerprint matched the trainer's.

The plan (rollout/weight_sync.py) is agreed once, at setup: every engine reports its regions (they
must agree), the trainer checks them against its tensors and lays out its flat buffer.

A rollout worker that dies (before or during a publish), or whose engine died under it (the actor is
then killed for Ray to restart), is restarted by Ray; its running rollouts are dropped as worker_lost (their prompts handed out again), a fresh weight-sync group is formed,
and every engine receives the current version and is verified against the trainer before anything
is generated again. A worker that stops answering is hung, not lost: the run stops, naming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ray

from rollout.weight_sync import SyncPlan

log = logging.getLogger("tether")

PING_TIMEOUT_S = 15.0  # a rollout worker that does not answer a ping this long is hung
RESTART_TIMEOUT_S = 600.0  # Ray restart plus engine start of a lost rollout worker


class WeightSyncTimeout(RuntimeError):
    """A member of the weight-sync protocol did not answer within weight_sync.timeout_s."""


class Fleet:
    def __init__(self, cfg, layout: dict, trainers: list, workers: list, service) -> None:
        self.cfg = cfg
        self.layout = layout
        self.trainers = trainers
        self.trainer = trainers[0]  # rank 0: the weight-sync root
        self.workers = workers
        self.service = service
        self.plan: SyncPlan | None = None
        self.ipc_handle: bytes | None = None
        self.incarnations: list[str] = []
        self.pids: list[int] = []
        self.hung = False  # a worker stopped answering: do not wait on it at close
        self.verified_publishes = 0
        self.faults = {"worker_restarts": 0, "rollouts_dropped_worker_lost": 0, "recovery_publishes_verified": 0,
                       "engine_deaths": 0, "trainer_restarts": 0, "steps_redone": 0}

    def replace_trainers(self, trainers: list) -> None:
        """A restarted trainer group: the plan is agreed and the weight-sync group formed again with it
        (`init_weight_sync`); the engines stay as they are."""
        self.trainers, self.trainer = trainers, trainers[0]
        self.plan, self.ipc_handle = None, None

    def _all_trainers(self, method: str, *args):
        """Call a method on every trainer rank (they take part in the same collectives); rank 0's result."""
        return ray.get([getattr(t, method).remote(*args) for t in self.trainers])[0]

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

    # ---- setup -------------------------------------------------------------------------
    def start_engines(self) -> None:
        ray.get([w.start.remote() for w in self.workers])  # engines up (vLLM: tens of seconds)
        infos = ray.get([w.ping.remote() for w in self.workers])
        self.incarnations, self.pids = [i["incarnation"] for i in infos], [i["pid"] for i in infos]

    def _agree_on_plan(self, which: list[int]) -> SyncPlan:
        """The plan from the regions `which` engines report; they, and any earlier plan, must agree."""
        bucket = self.cfg.weight_sync.bucket_mb << 20
        reported = self._await([(self._name(i), self.workers[i].weight_sync_regions.remote()) for i in which],
                               "reporting the engines' weight-sync regions")
        plans = [SyncPlan.build(regions, bucket) for regions in reported]
        reference = self.plan or plans[0]
        for i, plan in zip(which, plans):
            if plan != reference:
                raise RuntimeError(f"{self._name(i)} lays out its parameters differently from the other engines "
                                   f"({plan.summary()} vs {reference.summary()}); every engine must serve the same "
                                   "model with the same rollout.tensor_parallel_size and model.dtype")
        return reference

    def init_weight_sync(self, restarted: list[int] | None = None) -> None:
        """Agree on the plan (first time), then a fresh weight-sync group: the trainer and every engine.
        After a restart, only the `restarted` engines report their regions (and open the IPC buffer)."""
        which = list(range(len(self.workers))) if restarted is None else restarted
        plan = self._agree_on_plan(which)
        if self.plan is None:
            self._all_trainers("set_sync_plan", plan.to_plain())  # checks it against the trainer's tensors
            self.plan = plan
            log.info("weight sync plan: %s", plan.summary())
        plain = plan.to_plain()
        backend = self.layout["backend"]
        if backend == "ipc":  # no process group: each engine opens the trainer's buffer once
            if self.ipc_handle is None:
                self.ipc_handle = ray.get(self.trainer.ipc_handle.remote())
            self._await([(self._name(i), self.workers[i].init_weight_sync_ipc.remote(plain, self.ipc_handle))
                         for i in which], "opening the trainer's weight buffer")
            return
        tp = self.cfg.rollout.tensor_parallel_size
        world = 1 + tp * len(self.workers)
        host, port = ray.get(self.trainer.sync_address.remote())
        timeout = self.cfg.weight_sync.timeout_s
        # every member must join at once: the group forms only when all world_size ranks arrived
        self._await([("trainer rank 0", self.trainer.init_weight_sync.remote(host, port, world, backend, timeout))]
                    + [(self._name(i), w.init_weight_sync.remote(plain, host, port, 1 + tp * i, world, backend, timeout))
                       for i, w in enumerate(self.workers)], "joining the weight-sync group")

    # ---- publish, with recovery from lost rollout workers ------------------------------
    def publish(self, version: int, checkpoint: Callable[[], object] | None = None,
                lost: list[int] | None = None) -> dict:
        """Pause admission -> publish -> version -> [checkpoint] -> resume admission.

        Returns interrupted requests, bytes, `seconds` (the weight transfer: the slowest engine's
        receive, plus the trainer's fill when colocated), `idle_s` (admission paused: what a user
        feels) and `checkpoint` (what the checkpoint callable returned; None without one)."""
        t0 = time.perf_counter()
        ray.get(self.service.pause.remote())
        held = self.cfg.weight_sync.verify  # engines wait for the verification before generating
        if not lost:
            try:
                out = self.publish_weights(version, verify=held)
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
            out = self._recover(lost, version)
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
                self._recover(late, version)
                ray.get([w.end_publish.remote() for w in self.workers])
                lost = sorted({*(lost or []), *late})
        ray.get(self.service.resume.remote())
        if lost:
            ray.get([self.workers[i].run.remote() for i in lost])  # generation resumes under verified weights
        return {**out, "idle_s": time.perf_counter() - t0, "checkpoint": saved}

    def publish_weights(self, version: int, verify: bool) -> dict:
        """One call per engine (pause, receive, version; resume unless `verify`) beside the trainer's.
        With `verify`, the engines stay paused after the check: the caller resumes them (`end_publish`)."""
        what = f"weight sync of version {version}"
        if not self.cfg.rollout.interrupt_on_publish:
            # waiting for in-flight requests can take minutes: not inside the broadcast's timeout
            self._await([(self._name(i), w.begin_publish.remote()) for i, w in enumerate(self.workers)],
                        f"letting in-flight requests finish before version {version}")
        if self.layout["backend"] == "ipc":
            packed = self._all_trainers("publish_ipc")  # filled while the engines still generate
            got = self._await([(self._name(i), w.publish.remote(version, not verify))
                               for i, w in enumerate(self.workers)], what)
            seconds = packed["seconds"] + max(g["receive_s"] for g in got)
        else:
            # the trainer's broadcast meets each engine as soon as its requests are paused
            got = self._await([(f"trainer rank {k}", t.publish.remote()) for k, t in enumerate(self.trainers)]
                              + [(self._name(i), w.publish.remote(version, not verify))
                                 for i, w in enumerate(self.workers)], what)[len(self.trainers):]
            seconds = max(g["receive_s"] for g in got)
        if verify:
            self.verify_weights(version)
        return {"interrupted": sum(g["interrupted"] for g in got), "bytes": self.plan.nbytes, "seconds": seconds,
                "pause_s": max(g["pause_s"] for g in got)}

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

    def _recover(self, lost: list[int], version: int) -> dict:
        for i in lost:
            dropped = ray.get(self.service.worker_lost.remote(self.incarnations[i]))
            self.faults["rollouts_dropped_worker_lost"] += dropped
            log.warning("rollout worker %d lost: %d running rollouts dropped (worker_lost), prompts re-issued; "
                        "waiting for Ray to restart it", i, dropped)
        for i in lost:
            self._wait_restarted(i)
            self.faults["worker_restarts"] += 1  # counted now: a trainer lost meanwhile takes over the recovery
        ray.get([self.workers[i].start.remote() for i in lost])
        self.init_weight_sync(restarted=lost)
        out = self.publish_weights(version, verify=True)  # every engine == trainer, bitwise; engines held
        self.faults["recovery_publishes_verified"] += 1
        log.warning("rollout workers %s restarted, re-joined the weight sync and verified at version %d", lost, version)
        return out

    def check_workers(self, version: int) -> None:
        """Recover now from any lost rollout worker (the current version, re-published)."""
        lost = self.lost_workers()
        if lost:
            self.publish(version, lost=lost)

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

    def verify_weights(self, version: int) -> None:
        """Every engine must serve exactly the trainer's weights (bitwise, in the engine's dtype)."""
        expected = self._all_trainers("fingerprint")
        got = ray.get([w.fingerprint.remote() for w in self.workers])
        bad = [i for i, f in enumerate(got) if f != expected]
        if bad:
            raise RuntimeError(f"after publishing version {version}, rollout workers {bad} hold weights whose "
                               f"fingerprint differs from the trainer's ({[got[i] for i in bad]} != {expected})")
        self.verified_publishes += 1
