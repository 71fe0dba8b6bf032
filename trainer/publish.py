"""The driver's side of weight sync (docs/design.md section 6): the plan agreed once, the weight-sync
group, one transfer to every engine, and its verification.

    sync = WeightSync(cfg, backend, trainers, workers, name)
    sync.init()                                   # setup: the plan, the trainer's flat buffer, the group
    report = sync.transfer(version, verify)       # every engine receives the trainer's weights

The plan (weight_sync/plan.py) is agreed once: every engine reports its regions (they must agree),
the trainer checks them against its tensors and lays out its flat buffer. A transfer is one call
per engine (pause its requests, receive, set the version, resume unless held for verification)
beside the trainer's fill-and-broadcast. Colocated (CUDA IPC), the trainer fills its flat buffer
first, while the engines still generate, and each engine then copies out of it. Pausing admission
around it, and recovering from engines lost during it, is the fleet's (trainer/fleet.py).

Every call is bounded by weight_sync.timeout_s: a member that does not answer is named in a
WeightSyncTimeout, and `hung` is set so that the run does not wait on it again at close.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import ray

from weight_sync.messages import GroupAddress
from weight_sync.plan import SyncPlan

log = logging.getLogger("tether")


class WeightSyncTimeout(RuntimeError):
    """A member of the weight-sync protocol did not answer within weight_sync.timeout_s."""


class WeightSync:
    """trainers: the trainer ranks (rank 0 sends); workers: the rollout workers (their engines
    receive); name(i): how rollout worker i is named in errors; backend: gloo, nccl or ipc."""

    def __init__(self, cfg, backend: str, trainers: list, workers: list, name: Callable[[int], str]) -> None:
        self.cfg, self.backend, self.workers, self.name = cfg, backend, workers, name
        self.trainers = trainers
        self.plan: SyncPlan | None = None
        self.ipc_handle: bytes | None = None
        self.hung = False
        self.verified = 0  # transfers verified bitwise against the trainer

    def replace_trainers(self, trainers: list) -> None:
        """A restarted trainer group: the plan is agreed and the group formed again with it (`init`)."""
        self.trainers = trainers
        self.plan, self.ipc_handle = None, None

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

    def _all_trainers(self, method: str, *args):
        return ray.get([getattr(t, method).remote(*args) for t in self.trainers])[0]

    def _agree_on_plan(self, which: list[int]) -> SyncPlan:
        """The plan from the regions `which` engines report; they, and any earlier plan, must agree."""
        bucket = self.cfg.weight_sync.bucket_mb << 20
        reported = self._await([(self.name(i), self.workers[i].weight_sync_regions.remote()) for i in which],
                               "reporting the engines' weight-sync regions")
        plans = [SyncPlan.build(regions, bucket) for regions in reported]
        reference = self.plan or plans[0]
        for i, plan in zip(which, plans):
            if plan != reference:
                raise RuntimeError(f"{self.name(i)} lays out its parameters differently from the other engines "
                                   f"({plan.summary()} vs {reference.summary()}); every engine must serve the same "
                                   "model with the same rollout.tensor_parallel_size and model.dtype")
        return reference

    def init(self, restarted: list[int] | None = None) -> None:
        """Agree on the plan (first time), then a fresh weight-sync group: the trainer and every engine.
        After a restart, only the `restarted` engines report their regions (and open the IPC buffer)."""
        which = list(range(len(self.workers))) if restarted is None else restarted
        plan = self._agree_on_plan(which)
        if self.plan is None:
            self._all_trainers("set_sync_plan", plan)  # checks it against the trainer's tensors
            self.plan = plan
            log.info("weight sync plan: %s", plan.summary())
        root = self.trainers[0]
        if self.backend == "ipc":  # no process group: each engine opens the trainer's buffer once
            if self.ipc_handle is None:
                self.ipc_handle = ray.get(root.ipc_handle.remote())
            self._await([(self.name(i), self.workers[i].init_weight_sync_ipc.remote(plan, self.ipc_handle))
                         for i in which], "opening the trainer's weight buffer")
            return
        tp = self.cfg.rollout.tensor_parallel_size
        host, port = ray.get(root.sync_address.remote())
        address = GroupAddress(host, port, 1 + tp * len(self.workers), self.backend, self.cfg.weight_sync.timeout_s)
        # every member must join at once: the group forms only when all world_size ranks arrived
        self._await([("trainer rank 0", root.init_weight_sync.remote(address))]
                    + [(self.name(i), w.init_weight_sync.remote(plan, address, 1 + tp * i))
                       for i, w in enumerate(self.workers)], "joining the weight-sync group")

    def let_requests_finish(self, version: int) -> None:
        """rollout.interrupt_on_publish=false: every engine finishes its in-flight requests first."""
        self._await([(self.name(i), w.begin_publish.remote()) for i, w in enumerate(self.workers)],
                    f"letting in-flight requests finish before version {version}")

    def transfer(self, version: int, verify: bool) -> dict:
        """One call per engine (pause, receive, version; resume unless `verify`) beside the trainer's.
        With `verify`, the engines stay paused after the check: the caller resumes them (`end_publish`)."""
        what = f"weight sync of version {version}"
        if self.backend == "ipc":
            packed = self._all_trainers("publish_ipc")  # filled while the engines still generate
            got = self._await([(self.name(i), w.publish.remote(version, not verify))
                               for i, w in enumerate(self.workers)], what)
            seconds = packed.seconds + max(g.receive_s for g in got)
        else:
            # the trainer's broadcast meets each engine as soon as its requests are paused
            got = self._await([(f"trainer rank {k}", t.publish.remote()) for k, t in enumerate(self.trainers)]
                              + [(self.name(i), w.publish.remote(version, not verify))
                                 for i, w in enumerate(self.workers)], what)[len(self.trainers):]
            seconds = max(g.receive_s for g in got)
        if verify:
            self.verify(version)
        return {"interrupted": sum(g.interrupted for g in got), "bytes": self.plan.nbytes, "seconds": seconds,
                "pause_s": max(g.pause_s for g in got)}

    def verify(self, version: int) -> None:
        """Every engine must serve exactly the trainer's weights (bitwise, in the engine's dtype)."""
        expected = self._all_trainers("fingerprint")
        got = ray.get([w.fingerprint.remote() for w in self.workers])
        bad = [i for i, f in enumerate(got) if f != expected]
        if bad:
            raise RuntimeError(f"after publishing version {version}, rollout workers {bad} hold weights whose "
                               f"fingerprint differs from the trainer's ({[got[i] for i in bad]} != {expected})")
        self.verified += 1
