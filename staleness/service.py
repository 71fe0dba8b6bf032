"""The staleness service: a Ray actor that admits rollouts, hands out prompts and buffers results.

Rollout workers call `acquire` before each prompt group (it waits while the admission
rule of `StalenessController` says no) and `put` the finished group; the driver calls
`get_batch` for the next training batch and `pause`/`set_version`/`resume` around a
publish. The data cursor lives here too, so prompts are consumed in one seeded order
whatever the number of workers.

`snapshot()` (taken while admission is paused) and `restore()` carry the cursor and the
counters through a checkpoint. Groups admitted but not yet consumed at the snapshot are not in
the checkpoint's trainer state, so a restore un-admits them and hands their prompts out again
first: nothing is lost and nothing is trained on twice.
"""

from __future__ import annotations

import asyncio
import logging
import random

from rollout.trajectory import Trajectory
from staleness.controller import StalenessController

log = logging.getLogger(__name__)


def epoch_order(num_prompts: int, seed: int, epoch: int) -> list[int]:
    """The seeded order in which one epoch hands out the prompts."""
    order = list(range(num_prompts))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def prompt_order(num_prompts: int, seed: int, n: int) -> list[int]:
    """The first n prompts a run hands out (its data cursor from the start), over epochs."""
    out: list[int] = []
    epoch = 0
    while len(out) < n:
        out += epoch_order(num_prompts, seed, epoch)
        epoch += 1
    return out[:n]


def _trained(trajs: list[Trajectory]) -> int:
    return sum(not t.is_baseline for t in trajs)


def _zero_variance(group: list[Trajectory]) -> bool:
    """Every reward of the group equal (a ReMax greedy baseline included): every advantage would be 0."""
    return len({t.reward for t in group}) == 1


def _count_episodes(counts: dict[str, int], trajs: list[Trajectory]) -> None:
    """Add consumed episodes to `counts`: how many, their turns and tool calls, and their response
    tokens written by the model and by the environment."""
    for t in trajs:
        if "turns" not in t.info:
            continue  # a single-turn response
        model = t.num_trained_tokens
        for key, value in (("consumed", 1), ("turns", t.info["turns"]), ("tool_calls", t.info["tool_calls"]),
                           ("tool_errors", t.info["tool_errors"]), ("model_tokens", model),
                           ("env_tokens", len(t.response_ids) - model)):
            counts[key] = counts.get(key, 0) + value


class StalenessService:
    """Ray actor (async): `ray.remote(StalenessService).remote(...)`."""

    def __init__(self, batch_size: int, max_staleness: int, max_running: int | None, num_prompts: int, seed: int,
                 drop_zero_variance: bool = False, fixed_lag: int | None = None) -> None:
        self.ctl = StalenessController(batch_size, max_staleness, max_running)
        self.drop_zero_variance = drop_zero_variance  # algorithm.drop_zero_variance_groups (DAPO dynamic sampling)
        self._zero_variance_run = 0  # zero-variance groups dropped in a row
        # experimental control (staleness.fixed_lag): every batch is trained exactly k versions after its
        # rollouts started (min(k, version) during the first k steps); see `get_batch`
        self.fixed_lag = fixed_lag
        self.fixed_lag_short = 0  # fixed lag: groups trained younger than k versions (a dropped group's refill)
        self.num_prompts = num_prompts
        self.seed = seed
        self.cursor = 0  # prompts drawn from the shuffled order so far, over all epochs
        self.next_seq = 0  # ticket number of the next admitted group (its id and sampling seed)
        self._outstanding: dict[int, int] = {}  # seq -> prompt index of groups admitted, not yet consumed/dropped
        self._running: dict[int, tuple[str, int]] = {}  # seq -> (worker incarnation, n) of groups still generating
        self._started: dict[int, int] = {}  # seq -> policy version at admission, of the groups in _running
        self._lost: set[str] = set()  # incarnations of rollout workers that died
        self._requeued: list[int] = []  # prompts of groups un-admitted by a restore, handed out first
        self.requeued_total = 0
        self._order: list[int] = []
        self._buffer: list[list[Trajectory]] = []  # finished groups, oldest first
        self._consumed_ids: set[str] = set()
        self.episodes: dict[str, int] = {}  # consumed episodes (multi-turn rollouts): their turns, tool calls, tokens
        self._stopped = False
        self._halted = False  # admission refused until the next restore (a trainer restarted in the run)
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    def _next_prompt(self) -> int:
        epoch, pos = divmod(self.cursor, self.num_prompts)
        if pos == 0 or not self._order:
            self._order = epoch_order(self.num_prompts, self.seed, epoch)
        self.cursor += 1
        return self._order[pos]

    async def acquire(self, n: int, worker: str) -> dict | None:
        """Wait for admission of a group of n rollouts for the rollout worker incarnation `worker`;
        None once the service stopped (or that worker was declared lost while it waited: a
        request from a dead process must not admit anything)."""
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self._stopped or self._halted or worker in self._lost or self.ctl.can_admit(n))
            if self._stopped or self._halted or worker in self._lost:
                return None
            self.ctl.admit(n)
            seq, self.next_seq = self.next_seq, self.next_seq + 1
            prompt = self._requeued.pop(0) if self._requeued else self._next_prompt()
            self._outstanding[seq] = prompt
            self._running[seq] = (worker, n)
            self._started[seq] = self.ctl.version
            return {"seq": seq, "prompt_index": prompt, "version": self.ctl.version}

    async def put(self, group: list[Trajectory]) -> None:
        """A finished group. A ReMax baseline response rides along with its group but is not one of
        the admitted rollouts (it is never trained on), so it is not counted."""
        cond = self._condition()
        async with cond:
            seq = int(group[0].group_id)
            running = self._running.pop(seq, None)
            self._started.pop(seq, None)
            if running is None:
                log.warning("group %s arrived after its worker was declared lost; it was counted as dropped "
                            "(worker_lost) and its prompt re-issued, so it is discarded", group[0].group_id)
                return
            if self.drop_zero_variance and _zero_variance(group):
                # no signal to train on: dropped before the buffer, its slots go to groups that carry one
                self._outstanding.pop(seq, None)
                self.ctl.drop_running(running[1], "zero_variance")
                self._zero_variance_run += 1
                if self._zero_variance_run % 100 == 0:
                    log.warning("the last %d finished groups all had equal rewards and were dropped "
                                "(algorithm.drop_zero_variance_groups): no batch can form while every group "
                                "gets the same reward; the task may be too hard or too easy for this policy",
                                self._zero_variance_run)
                cond.notify_all()
                return
            self._zero_variance_run = 0
            self.ctl.finish(_trained(group))
            self._buffer.append(group)
            cond.notify_all()

    async def drop(self, seq: int, reason: str) -> None:
        """Group `seq` ends without a result (an error, the run's end)."""
        cond = self._condition()
        async with cond:
            running = self._running.pop(seq, None)
            self._started.pop(seq, None)
            if running is None:
                return  # already dropped as worker_lost
            self._outstanding.pop(seq, None)
            self.ctl.drop_running(running[1], reason)
            cond.notify_all()

    async def worker_lost(self, worker: str) -> int:
        """A rollout worker (incarnation) died: its running groups are dropped (reason worker_lost) and
        their prompts handed out again first; its finished groups stay in the buffer; admissions it
        was still waiting for are refused. Returns the rollouts dropped."""
        cond = self._condition()
        async with cond:
            self._lost.add(worker)
            lost = sorted(seq for seq, (w, _) in self._running.items() if w == worker)
            dropped = 0
            for seq in lost:
                _, n = self._running.pop(seq)
                self._started.pop(seq, None)
                self._requeued.append(self._outstanding.pop(seq))
                self.ctl.drop_running(n, "worker_lost")
                dropped += n
            cond.notify_all()
            return dropped

    async def get_batch(self, n: int) -> list[Trajectory]:
        """The next n trajectories (whole groups, oldest first; see `_next_eligible`). A group whose lag would exceed
        staleness.max_staleness (possible only for a rollout slower than eta+1 whole steps)
        is dropped with reason "stale" instead of being trained on.

        With staleness.fixed_lag = k, the batch waits first until the pipeline is full (accepted + running =
        (i + eta + 1) B): only then has version i admitted its share, so that the batch of version i + k
        finds B rollouts started at version i. Without the wait the driver moves on as soon as one batch
        is ready, the versions advance faster than the rollouts are admitted, and version k finds nothing
        k versions old (the stall this wait fixes)."""
        cond = self._condition()
        async with cond:
            if self.fixed_lag is not None:
                await cond.wait_for(lambda: self._stopped or self.ctl.accepted + self.ctl.running >= self.ctl.capacity())
            batch: list[Trajectory] = []
            while _trained(batch) < n:
                await cond.wait_for(lambda: self._next_eligible() is not None or self._stopped)
                index = self._next_eligible()
                if index is None:
                    raise RuntimeError(f"the staleness service stopped with {len(batch)} of {n} trajectories batched")
                group = self._buffer.pop(index)
                self._outstanding.pop(int(group[0].group_id), None)
                if self.ctl.version - group[0].start_version > self.ctl.max_staleness:
                    self.ctl.drop_buffered(_trained(group), "stale")
                    log.warning("dropped stale group %s (started at version %d, now %d)",
                                group[0].group_id, group[0].start_version, self.ctl.version)
                    continue
                if self.fixed_lag is not None and group[0].start_version > self._newest_for_fixed_lag():
                    self.fixed_lag_short += 1
                    log.warning("staleness.fixed_lag=%d: group %s trained %d versions after it started, not %d (a "
                                "dropped group's prompt slot was refilled later)", self.fixed_lag, group[0].group_id,
                                self.ctl.version - group[0].start_version, min(self.fixed_lag, self.ctl.version))
                batch.extend(group)
            batch_trained = [t for t in batch if not t.is_baseline]
            for traj in batch_trained:
                if traj.traj_id in self._consumed_ids:
                    raise RuntimeError(f"trajectory {traj.traj_id} would be consumed twice")
                self._consumed_ids.add(traj.traj_id)
            self.ctl.consume(len(batch_trained), [self.ctl.version - t.start_version for t in batch_trained])
            _count_episodes(self.episodes, batch_trained)
            cond.notify_all()
            return batch

    def _newest_for_fixed_lag(self) -> int:
        return self.ctl.version - min(self.fixed_lag, self.ctl.version)

    def _next_eligible(self) -> int | None:
        """Buffer index of the next group to batch: the oldest one, or with staleness.fixed_lag = k the
        oldest that started at least min(k, version) versions ago (newer ones wait their turn). If none
        did and none that did is still generating (a dropped group left a hole that was refilled at a
        later version), the oldest group: a batch one group short of the lag rather than a stall."""
        if self.fixed_lag is None or not self._buffer:
            return 0 if self._buffer else None
        newest = self._newest_for_fixed_lag()
        ready = next((i for i, g in enumerate(self._buffer) if g[0].start_version <= newest), None)
        if ready is not None or any(v <= newest for v in self._started.values()):
            return ready
        return min(range(len(self._buffer)), key=lambda i: self._buffer[i][0].start_version)

    async def pause(self) -> None:
        self.ctl.paused = True

    async def resume(self) -> None:
        cond = self._condition()
        async with cond:
            self.ctl.paused = False
            cond.notify_all()

    async def set_version(self, version: int) -> None:
        cond = self._condition()
        async with cond:
            self.ctl.set_version(version)
            cond.notify_all()

    async def stop(self) -> None:
        cond = self._condition()
        async with cond:
            self._stopped = True
            cond.notify_all()

    async def halt(self) -> None:
        """Refuse every admission, waiting ones included, until `restore`: the rollout workers' loops end
        (a trainer is being restarted and the service rolled back to its checkpoint)."""
        cond = self._condition()
        async with cond:
            self._halted = True
            cond.notify_all()

    async def accounting(self) -> dict:
        acc = self.ctl.accounting()
        acc["prompts_handed_out"] = self.cursor
        acc["requeued_on_resume"] = self.requeued_total
        if self.fixed_lag is not None:
            acc["fixed_lag_short_groups"] = self.fixed_lag_short
        if self.episodes:
            acc["episodes"] = dict(self.episodes)
        return acc

    async def snapshot(self) -> dict:
        """Cursor and counters for a checkpoint (JSON-able). Call while admission is paused."""
        return {"cursor": self.cursor, "next_seq": self.next_seq, "controller": self.ctl.state_dict(),
                "outstanding": [self._outstanding[s] for s in sorted(self._outstanding)],
                "requeued": list(self._requeued), "requeued_total": self.requeued_total, "episodes": dict(self.episodes)}

    async def restore(self, snap: dict) -> None:
        """Continue from a snapshot. Its running and buffered groups died with the old run: they are
        un-admitted and their prompts are handed out again, oldest first, before new ones. In a live
        service (a trainer restarted in the run) the groups admitted since the snapshot are forgotten
        too: the generation loops were stopped first, and what they had finished is discarded."""
        self.cursor, self.next_seq = snap["cursor"], snap["next_seq"]
        self._order = []  # the next draw rebuilds the seeded order of the cursor's epoch
        self.ctl.load_state_dict(snap["controller"])
        self._requeued = list(snap["requeued"]) + list(snap["outstanding"])
        self.requeued_total = snap["requeued_total"] + len(snap["outstanding"])
        self.episodes = dict(snap.get("episodes", {}))  # absent in checkpoints written before episodes existed
        self._outstanding = {}
        self._running = {}
        self._started = {}
        self._buffer = []
        self._halted = False
        # tickets from next_seq on are issued again: what they produced before the rollback is forgotten
        self._consumed_ids = {i for i in self._consumed_ids if int(i.split("-", 1)[0]) < self.next_seq}

    async def state(self) -> dict:
        return {"version": self.ctl.version, "paused": self.ctl.paused, "admitted": self.ctl.admitted, "running": self.ctl.running,
                "buffered": self.ctl.buffered, "dropped": sum(self.ctl.dropped.values())}
