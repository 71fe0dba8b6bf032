"""The ways users run jobs: scripts/train.py with Hydra overrides and sweeps, `ray job submit`
against a local head, wandb offline runs, scripts/plot.py on a finished run."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TINY = ["model=tiny", "rollout.engine=hf", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.group_size=2",
        "rollout.max_new_tokens=4", "task.num_eval=2", "eval.max_new_tokens=2", "rollout.num_cpus=0.5",
        "trainer.num_cpus=0.5", "rewards.num_workers=1", "ray.num_cpus=2", "logger.progress=false"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
                "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_processes_mentioning(marker: str) -> None:
    """Stop exactly the Ray head this test started (`ray stop` would stop every Ray on the machine)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if marker in (pid_dir / "cmdline").read_bytes().decode(errors="ignore"):
                os.kill(int(pid_dir.name), 9)
        except (OSError, ProcessLookupError):
            pass


def _train(args, cwd, timeout=600):
    return subprocess.run([PY, str(REPO / "scripts/train.py"), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_bad_override_is_one_line_before_any_actor(tmp_path):
    out = _train([*TINY, "staleness.max_staleness=-1", f"output_dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "error: staleness.max_staleness=-1 must be >= 0; use 0 for synchronous training")
    assert "Traceback" not in out.stderr and "Started a local Ray" not in out.stderr


def test_unknown_key_and_missing_model_path_fail_fast(tmp_path):
    out = _train([*TINY, "trainer.no_such_key=1"], cwd=tmp_path, timeout=120)
    assert out.returncode != 0 and "no_such_key" in out.stderr
    out = _train(["model=hf", "model.path=/nonexistent/model", f"output_dir={tmp_path}"], cwd=tmp_path, timeout=120)
    assert out.returncode != 0 and "model.path='/nonexistent/model'" in out.stderr.strip().splitlines()[-1]


def test_multirun_sweep_writes_one_directory_per_run(tmp_path, tiny_model_dir):
    sweep = tmp_path / "sweep"
    out = _train(["-m", *TINY, "staleness.max_staleness=0,1", "logger.wandb.mode=offline", "logger.sample_every=1",
                  f"hydra.sweep.dir={sweep}"], cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    assert [r.name for r in runs] == ["0", "1"]
    for eta, run in enumerate(runs):
        assert f"max_staleness: {eta}" in (run / "config.yaml").read_text()
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
        assert {s["step"] for s in samples} == {1, 2} and all("response" in s for s in samples)
        # wandb offline: the run file holds the summary values (protobuf records: each key is followed
        # by its JSON value), the same as summary.json
        (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
        data = wandb_file.read_bytes()
        summary = json.loads((run / "summary.json").read_text())
        for key in ("eval/reward_final", "eval/reward_best", "perf/consumed_tokens_per_s"):
            at = data.rfind(key.encode())
            assert at >= 0, key
            assert json.dumps(summary[key]).encode() in data[at : at + len(key) + 40], key
    # plots of several runs overlaid
    png = tmp_path / "sweep.png"
    plot = subprocess.run([PY, str(REPO / "scripts/plot.py"), *map(str, runs), "--out", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.stat().st_size > 1000


def test_ray_job_submit_to_a_local_head(tmp_path, tiny_model_dir):
    ray_bin = str(Path(PY).parent / "ray")
    # Ray's token authentication, with a token of this test's own for the head and the client
    env = _env(TETHER_CACHE=str(Path(tiny_model_dir).parents[1]), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(16))
    port = 26379
    temp_dir = f"/tmp/tether-rj{os.getpid()}"  # short: Ray's socket paths must stay under ~107 characters
    # ports of its own: another Ray (the suite's local instance) may hold the default agent ports
    agent, grpc, metrics, runtime_env = (_free_port() for _ in range(4))
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", "--dashboard-port=28265", "--num-cpus=2", "--disable-usage-stats",
                    f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                    f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                    f"--temp-dir={temp_dir}"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        out_dir = tmp_path / "job_out"
        for _ in range(12):  # the head's job agent can take a few seconds longer than `ray start`
            job = subprocess.run(
                [ray_bin, "job", "submit", "--address", "http://127.0.0.1:28265", "--working-dir", str(REPO),
                 "--runtime-env-json", json.dumps({"excludes": [".venv", ".cache", "outputs", ".git"],
                                                    "env_vars": {"TETHER_CACHE": env["TETHER_CACHE"]}}),
                 "--", "python", "scripts/train.py", *TINY, "logger.wandb.mode=disabled", f"output_dir={out_dir}"],
                env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(5)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()  # "Job ... succeeded"
        rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
    finally:
        _kill_processes_mentioning(temp_dir)
        time.sleep(1)
