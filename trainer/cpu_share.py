"""The trainer's threads on a CPU node it shares with the engines.

Synchronous (eta = 0), the engines idle while the trainer trains: it takes every core. Asynchronous,
they generate while it trains, but not all the time: in a trainer-bound run an engine fills the
staleness window in a fraction of a step and then waits for the next version. A fixed split (the
trainer on the cores the engines do not ask for) leaves those cores idle for the rest of the step; all
cores for the trainer oversubscribes the node while the engines run (OpenMP threads spinning at a
barrier while another process holds their core).

`CoreShare` follows the node instead: a sampler thread reads, every `period_s`, how busy the CPUs this
process may run on were (Linux /proc/stat) minus this process's own CPU time (/proc/self/stat), i.e. the
cores the rest of the node is using, and `apply()` sets the trainer's intra-op threads to the cores left
(at least one). `follow(model)` calls `apply()` before every decoder layer's forward and backward, so a
step adapts within a layer's time. The sampler only reads counters; nothing here blocks the step.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import torch

log = logging.getLogger(__name__)

BUSY_THRESHOLD = 0.3  # cores the rest of the node uses above this (0.3 of a core) take a core away


def fixed_threads(cfg, cores: int) -> int:
    """The trainer's intra-op threads on CPU when trainer.torch_threads is unset and the node cannot be
    followed (no /proc): every core at eta = 0, the cores the engines do not ask for at eta > 0 (2 cores,
    one engine, eta = 4: the step took 22.3 s with two threads against the engine's, 17.3 s with one)."""
    if cfg.staleness.max_staleness == 0:
        return cores
    engines = cfg.rollout.num_workers * cfg.rollout.num_cpus
    return max(1, min(cores, int(cores - engines)))


def threads_for(cores: int, others_busy: float) -> int:
    """Intra-op threads that leave the rest of the node the cores it is using (whole cores, rounded up
    once it uses more than BUSY_THRESHOLD of one), at least one."""
    taken = max(0, math.ceil(others_busy - BUSY_THRESHOLD))
    return max(1, min(cores, cores - taken))


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _busy_ticks(cpus: set[int]) -> int:
    """Busy clock ticks (all but idle and iowait) of `cpus`, summed, from /proc/stat."""
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            if int(name[3:]) in cpus:
                ticks = [int(x) for x in fields[:8]]
                busy += sum(ticks) - ticks[3] - ticks[4]
    return busy


def _own_ticks() -> int:
    """User + system clock ticks of this process (every thread), from /proc/self/stat."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


class CoreShare:
    """The cores the rest of the node leaves this process, sampled by a daemon thread."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.cpus = _cpus()
        self.cores = len(self.cpus)
        self.period_s = period_s
        self.hz = os.sysconf("SC_CLK_TCK")
        self.others_busy = 0.0  # cores, over the last period
        self.threads = self.cores
        self.changes = 0  # how often apply() changed the threads (a metric)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="core-share", daemon=True)

    @staticmethod
    def available() -> bool:
        try:
            _busy_ticks(set(_cpus()))
            _own_ticks()
            return True
        except (OSError, ValueError, IndexError):
            return False

    def start(self) -> "CoreShare":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        cpus = set(self.cpus)
        last = (time.monotonic(), _busy_ticks(cpus), _own_ticks())
        while not self._stop.wait(self.period_s):
            now = (time.monotonic(), _busy_ticks(cpus), _own_ticks())
            elapsed = now[0] - last[0]
            if elapsed > 0:
                others = ((now[1] - last[1]) - (now[2] - last[2])) / self.hz / elapsed
                self.others_busy = max(0.0, others)
            last = now

    def apply(self) -> None:
        """Set this thread's intra-op threads to the cores left (call it from the training thread:
        OpenMP's thread count is per calling thread)."""
        want = threads_for(self.cores, self.others_busy)
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
            self.changes += 1

    def follow(self, layers: list[torch.nn.Module]) -> None:
        """apply() before every layer's forward, and before its backward (a hook on its output)."""

        def before(_module, _args):
            self.apply()

        def after(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda _grad: self.apply())

        for layer in layers:
            layer.register_forward_pre_hook(before)
            layer.register_forward_hook(after)


def setup(cfg, layers: list[torch.nn.Module]) -> CoreShare | None:
    """The trainer's threads on CPU (trainer/worker.py): trainer.torch_threads if set; else every core at
    eta = 0; else, at eta > 0, a CoreShare that follows the node (when /proc can be read) or the fixed
    split of `fixed_threads`. `layers`: the decoder layers of every model the trainer runs (the policy's,
    the critic's). Returns the CoreShare, if any."""
    cores = len(_cpus())
    if cfg.trainer.torch_threads:
        torch.set_num_threads(cfg.trainer.torch_threads)
        return None
    if cfg.staleness.max_staleness == 0:
        torch.set_num_threads(cores)  # Ray's OMP_NUM_THREADS would hold it to trainer.num_cpus
        return None
    if not CoreShare.available():
        torch.set_num_threads(fixed_threads(cfg, cores))
        return None
    share = CoreShare().start()
    torch.set_num_threads(share.threads)
    share.follow(layers)
    log.info("trainer threads follow the node's free cores (%d cores)", cores)
    return share
