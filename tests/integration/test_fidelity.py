"""scripts/fidelity.py for real, on CPU with the tiny model: two runs side by side on one Ray instance, the
experiment's JSON, a time budget that leaves runs pending, a grid stopped midway, and a second command
that reads the finished runs back and runs only what is pending. Also the overrides of --gpu-share against
the cluster's placement rules (no GPU needed)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fidelity.py"
PY = sys.executable
# seconds per run on 2 cores: a tiny random model, the transformers engine, 2 steps of 4 trajectories
TINY = ["model=tiny", "rollout.engine=hf", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.group_size=2",
        "rollout.max_new_tokens=4", "task.num_eval=2", "eval.max_new_tokens=2", "eval.every_steps=1",
        "rollout.num_cpus=0.5", "trainer.num_cpus=0.5", "rewards.num_workers=1"]
SETTINGS = ("ppo-eta0", "decoupled_ppo-eta0")  # `staleness --etas 0`: coupled vs decoupled PPO, synchronous


def _fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fidelity", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # the grid starts its own instance
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"})
    return env


def _grid(out: Path, *args: str) -> list[str]:
    return [PY, str(SCRIPT), "staleness", "--etas", "0", "--out-dir", str(out), *args, *TINY]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _summary(out: Path) -> dict:
    return json.loads((out / "staleness.json").read_text())


def _children_of(out: Path) -> list[int]:
    """Processes whose command line names the grid's directory (its runs' drivers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_gpu_share_overrides_put_one_colocated_run_on_each_logical_gpu():
    """--gpu-share 0.2 on a 140 GiB GPU: the grid's Ray instance declares one logical GPU per parallel run;
    each run, colocated, occupies exactly one (its trainer and engine share that bundle), its engine gets a
    fixed 7 GiB KV cache and needs 10 % of the GPU free at start, and the config passes the resolved checks."""
    from configs.schema import validate_resolved
    from tests.conftest import compose
    from trainer.cluster import Placement, layout, resolve

    fidelity = _fidelity()
    overrides = fidelity._share_overrides(0.2, 140.0)
    assert overrides == ["rollout.colocate=true", "rollout.gpu_memory_utilization=0.1", "rollout.kv_cache_gib=7"]
    cfg = compose(overrides)
    resolve(cfg, 5)  # five logical GPUs: five runs at once
    validate_resolved(cfg)
    lay = layout(cfg)
    assert lay["colocate"] and lay["backend"] == "ipc"
    placement = Placement(cfg, lay)
    assert placement.gpus_needed() == 1 and placement.shared == [[("trainer", 0), ("rollout", 0)]]
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.kv_cache_gib == 7


def test_bad_options_name_the_option_and_the_way_out(tmp_path):
    out = _run([PY, str(SCRIPT), "advantage", "--out-dir", str(tmp_path), "--gpu-share", "0.5"], timeout=120)
    if "needs a GPU" not in out.stderr:  # a machine with a GPU gets past this check
        pytest.skip("this machine has a GPU")
    assert out.returncode != 0 and "--gpu-share needs a GPU" in out.stderr and "leave it out" in out.stderr
    out = _run([PY, str(SCRIPT), "advantage", "--out-dir", str(tmp_path), "trainer.no_such_key=1"], timeout=120)
    assert out.returncode != 0 and "error: the overrides of setting remax" in out.stderr
    assert not (tmp_path / "advantage").exists()  # nothing ran


def test_parallel_grid_resumes_after_a_budget_and_a_stop(tmp_path):
    out = tmp_path / "fid"
    runs = out / "staleness"

    # 1. two runs side by side, on the grid's one Ray instance
    t0 = time.monotonic()
    first = _run(_grid(out, "--seeds", "0", "--parallel", "2"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    starts = [line for line in first.stderr.splitlines() if line.startswith("start ")]
    assert len(starts) == 2
    s = _summary(out)
    assert s["pending"] == [] and s["seeds"] == [0] and set(s["grid"]) == set(SETTINGS)
    assert s["grid"]["ppo-eta0"] == ["algorithm.loss=ppo", "staleness.max_staleness=0", "staleness.fixed_lag=0",
                                     "trainer.num_minibatches=4"]
    assert "checkpoint.enabled=false" in s["common"] and s["overrides"] == TINY
    for name in SETTINGS:
        (run,) = s["runs"][name]
        assert run["seed"] == 0 and run["steps"] == 2 and run["wall_s"] > 0
        # curves: eval reward before training and after each step, against steps and trajectories (4 a step)
        assert [(p["step"], p["trajectories"]) for p in run["eval"]] == [(0, 0), (1, 4), (2, 8)]
        assert all(0 <= p["reward"] <= 1 for p in run["eval"])
        assert set(run["metrics"]) == {"policy/behav_kl", "policy/behav_ess", "policy/behav_weight_capped_frac",
                                       "policy/clipfrac", "staleness/lag_mean"}
        assert run["metrics"]["staleness/lag_mean"] == 0 and run["metrics"]["policy/clipfrac"] is not None
        row = s["table"][name]
        assert row["seeds"] == 1 and row["final_eval_std"] is None  # one seed: no spread
        assert row["final_eval_mean"] == row["final_eval_min"] == row["final_eval_max"] == run["final_eval"]
        assert f"algorithm.loss={name.split('-')[0]}" in run["overrides"] and "seed=0" in run["overrides"]
    # the runs overlapped: together they took less than one after the other
    walls = [r["wall_s"] for name in SETTINGS for r in s["runs"][name]]
    assert s["wall"]["grid_s"] < sum(walls) and len(s["wall"]["sessions"]) == 1
    assert (out / "staleness.png").stat().st_size > 0 and "| ppo-eta0 | 1 |" in (out / "staleness.md").read_text()
    finished = {name: (runs / f"{name}-seed0" / "summary.json").stat().st_mtime_ns for name in SETTINGS}
    first_s = time.monotonic() - t0

    # 2. a budget shorter than a typical run: nothing starts, the new seed's runs are pending
    budget = _run(_grid(out, "--seeds", "0,1", "--parallel", "2", "--time-budget-s", "5"))
    assert budget.returncode == 0, budget.stderr[-3000:]
    assert "start " not in budget.stderr and "Ray instance" not in budget.stderr
    s = _summary(out)
    assert s["pending"] == ["ppo-eta0-seed1", "decoupled_ppo-eta0-seed1"] and len(s["wall"]["sessions"]) == 1
    assert "pending (" in budget.stderr and "--time-budget-s left" in budget.stderr

    # 3. stopped midway (SIGTERM, as a command's time limit would): running runs stop and stay pending
    grid = subprocess.Popen(_grid(out, "--seeds", "0,1", "--parallel", "2"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((runs / f"{n}-seed1" / "run.log").exists() for n in SETTINGS) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # the runs are under way (a run takes tens of seconds here)
        grid.send_signal(signal.SIGTERM)
        console, _ = grid.communicate(timeout=60)
    finally:
        if grid.poll() is None:
            grid.kill()
    assert grid.returncode == 130, console[-3000:]
    assert "stopped ppo-eta0-seed1" in console and "stopped decoupled_ppo-eta0-seed1" in console
    s = _summary(out)
    assert s["pending"] == ["ppo-eta0-seed1", "decoupled_ppo-eta0-seed1"] and s["running"] == []
    assert all(len(s["runs"][n]) == 1 for n in SETTINGS)
    assert not (runs / "ppo-eta0-seed1" / "summary.json").exists() and (runs / "ppo-eta0-seed1").is_dir()
    time.sleep(1)
    assert _children_of(out) == []  # no run's driver outlived the grid
    (runs / "ppo-eta0-seed1" / "left-by-the-stopped-run").write_text("")

    # 4. the same command again: the finished runs are read back, the interrupted ones run from scratch
    again = _run(_grid(out, "--seeds", "0,1", "--parallel", "2"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [line.split(":")[0] for line in again.stderr.splitlines() if line.startswith("start ")] == [
        "start ppo-eta0-seed1", "start decoupled_ppo-eta0-seed1"]
    assert "removing it to run it again" in again.stderr
    assert not (runs / "ppo-eta0-seed1" / "left-by-the-stopped-run").exists()
    assert {n: (runs / f"{n}-seed0" / "summary.json").stat().st_mtime_ns for n in SETTINGS} == finished
    s = _summary(out)
    assert s["pending"] == [] and s["failed"] == {}
    for name in SETTINGS:
        assert sorted(r["seed"] for r in s["runs"][name]) == [0, 1]
        row = s["table"][name]
        assert row["seeds"] == 2 and row["final_eval_std"] is not None and row["final_eval_std"] >= 0
        assert row["final_eval_min"] <= row["final_eval_mean"] <= row["final_eval_max"]
    # every command that ran something is counted in the grid's wall time
    sessions = s["wall"]["sessions"]
    assert len(sessions) == 3 and [x["runs_finished"] for x in sessions] == [2, 0, 2]
    assert s["wall"]["grid_s"] == pytest.approx(sum(x["wall_s"] for x in sessions))
    assert sessions[0]["wall_s"] <= first_s
