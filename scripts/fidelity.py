"""Does it learn? The algorithm experiments of the README, one command each: a grid of training runs
(every setting stated in the run's config.yaml), a JSON of each run's curves, a summary table and a plot.

    python scripts/fidelity.py staleness --parallel 5 --gpu-share 0.2                    # 30 runs, five at a time on one GPU
    python scripts/fidelity.py staleness --parallel 5 --gpu-share 0.2 --time-budget-s 540  # 9 min of it; again until none is pending
    python scripts/fidelity.py advantage --task gsm8k rollout.max_new_tokens=256 eval.max_new_tokens=256   # word problems
    python scripts/fidelity.py advantage --seeds 0 --parallel 2 model=tiny rollout.engine=hf trainer.max_steps=2 rollout.num_cpus=0.5 trainer.num_cpus=0.5   # CPU; Hydra overrides go last

The experiments: `staleness` (coupled `algorithm.loss=ppo` vs `decoupled_ppo` at eta = --etas, each
batch exactly eta versions old: staleness.fixed_lag, 4 PPO updates per batch), `invariance` (B = 64 vs
B = 16 with batch_invariance.reference_batch_size=64 and without, 640 trajectories each), `ewma` (the
recomputed vs the EWMA proximal policy at eta 4 and 8), `advantage` (ReMax, GRPO, RLOO, Dr. GRPO at equal
trajectories), `critic` (ReMax, GRPO and PPO with a critic, GAE, on the same task and steps). Every setting runs
once per seed (--seeds).

Outputs. Runs go to <out-dir>/<experiment>/<setting>-seed<s>/ (metrics.jsonl, evals.json, config.yaml,
summary.json, run.log: the run's console, run.json: its overrides and wall time); --task T puts them
under <experiment>-<T> instead. <out-dir>/<experiment>.json holds the command, the grid (setting ->
overrides), the common overrides, the seeds, per run its overrides, curves (eval reward against steps
and against trajectories consumed), the means over steps of policy/behav_kl, policy/behav_ess,
policy/behav_weight_capped_frac, policy/clipfrac and staleness/lag_mean, and its wall time; per setting
the mean, standard deviation (over seeds, n - 1), min and max of the final eval reward; the runs still
pending; the wall time of every command that worked on the grid (with several runs on one GPU, that
is the GPU time). <experiment>.md is the table and <experiment>.png the plot (mean over seeds, band =
+- one standard deviation). All three are rewritten after every finished run.

Resume. A run whose summary.json exists is read back, not run again (if it was run with other overrides
the command stops and says so). A run directory without summary.json was interrupted (or failed: its
run.log says why): it is removed and the run starts again from scratch. Runs keep no checkpoints (checkpoint.enabled=false): for the
135M model most of a run is its start-up (Ray, the engine, CUDA graphs), which a resumed run pays
again anyway, and a checkpoint with its optimizer state is 1.6 GB to write. With
checkpoint.enabled=true among the overrides, an interrupted run that left a complete checkpoint is
resumed from it instead (checkpoint.resume=auto). So a grid can be spread over several commands, each
bounded by --time-budget-s: no run is started once less than a typical run (the median wall time of
the finished ones) is left, and runs still going at the deadline are stopped and stay pending. Leave
room after the budget for the shutdown (about half a minute).

Runs side by side. Each run is a process of its own (this script, in its single-run mode), all of
them drivers on ONE Ray instance that this command starts (or the cluster named by RAY_ADDRESS, which
must then have room for --parallel runs: an existing cluster is never resized). On a GPU machine,
--gpu-share F gives each run F of one GPU: the Ray instance declares --parallel logical GPUs on that
one GPU, every run takes one of them with its trainer and engine colocated (rollout.colocate=true,
weights by CUDA IPC), and its engine gets a fixed KV cache of F/4 of the GPU's memory
(rollout.kv_cache_gib; vLLM sizes nothing from the memory the other runs happen to use at that moment)
and needs F/2 of the GPU free when it starts (rollout.gpu_memory_utilization, vLLM's start-up check).
Without --gpu-share, --parallel N on a GPU gives each run 1/N. On CPU the runs share the cores: give
them fewer CPUs each (rollout.num_cpus=0.5 trainer.num_cpus=0.5) so that N fit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from fidelity_report import PER_STEP, markdown, plot, summarise, write_json  # noqa: E402

log = logging.getLogger("fidelity")

EXPERIMENTS = ("staleness", "invariance", "ewma", "advantage", "critic")
TASKS = sorted(p.stem for p in (REPO / "configs" / "task").glob("*.yaml"))
# every run: the bundled model on its default task, no checkpoints, evaluation every 10 steps
COMMON = ["logger.wandb.mode=disabled", "logger.progress=false", "logger.sample_every=0",
          "checkpoint.enabled=false", "checkpoint.export_hf=false", "eval.every_steps=10"]
RUN_FILE = "run.json"  # beside the run's outputs: its overrides and wall time (written by the grid)
POLL_S = 1.0
KILL_GRACE_S = 10.0


def _grid(experiment: str, etas: list[int]) -> list[tuple[str, list[str]]]:
    """(setting name, overrides) of an experiment."""
    if experiment == "staleness":
        # AReaL Table 2 in small: several updates per batch (the trust region acts) and a fixed lag, so every
        # batch is exactly eta versions old whatever the speed of generation (Hilton et al.'s control)
        out = []
        for loss in ("ppo", "decoupled_ppo"):
            for eta in etas:
                out.append((f"{loss}-eta{eta}", [f"algorithm.loss={loss}", f"staleness.max_staleness={eta}",
                                                 f"staleness.fixed_lag={eta}", "trainer.num_minibatches=4"]))
        return out
    if experiment == "invariance":
        # Hilton et al.: B = 64 against B = 16 (c = 4) with the rules derived from B_ref = 64, and B = 16
        # with the reference's learning rate and EWMA unchanged; PPO-EWMA and EWMA advantage normalisation,
        # so every rule has something to act on. Equal trajectories: 640 each.
        base = ["algorithm.proximal=ewma", "algorithm.adv_norm_span=4", "trainer.lr=2e-5"]
        return [("B64", [*base, "trainer.batch_size=64", "trainer.max_steps=10", "eval.every_steps=2"]),
                ("B16-rules", [*base, "trainer.batch_size=16", "trainer.max_steps=40",
                               "batch_invariance.reference_batch_size=64"]),
                ("B16-no-rules", [*base, "trainer.batch_size=16", "trainer.max_steps=40"])]
    if experiment == "ewma":
        return [(f"{prox}-eta{eta}", [f"algorithm.proximal={prox}", f"staleness.max_staleness={eta}",
                                      f"staleness.fixed_lag={eta}", "trainer.num_minibatches=4"])
                for eta in (4, 8) for prox in ("recompute", "ewma")]
    if experiment == "advantage":
        # the same batch size for all: equal trajectories trained on (ReMax's greedy baselines are extra
        # generations, not trained on)
        return [(adv, [f"algorithm.advantage={adv}"]) for adv in ("remax", "grpo", "rloo", "dr_grpo")]
    if experiment == "critic":
        # ReMax against PPO with a critic (GAE, the value model from the policy with a fresh head, gamma = lambda
        # = 1) and GRPO, on the same task and steps; time/critic_s and memory/max_allocated_gib say what the
        # critic costs (the ReMax paper's comparison, in small)
        return [("remax", ["algorithm.advantage=remax"]), ("grpo", ["algorithm.advantage=grpo"]),
                ("ppo-critic", ["algorithm.advantage=gae", "critic.lr=1e-5"])]
    raise SystemExit(f"error: unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}")


# ---- one run: its directory, its record, what is read back -----------------------------------

@dataclass
class Run:
    name: str  # the setting
    seed: int
    out: Path
    own: list[str]  # the common overrides, the setting's and the seed
    user: list[str]  # the command line's, last (they win)
    placement: list[str]  # where it runs (GPU share, memory): free to differ between commands
    cfg: object = None  # composed and checked before anything starts
    status: str = "pending"  # pending | running | finished | failed
    result: dict | None = None
    wall_s: float | None = None
    error: str | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float | None = None  # time.monotonic() when this command started it

    @property
    def key(self) -> str:
        return f"{self.name}-seed{self.seed}"

    @property
    def identity(self) -> list[str]:
        """The overrides that decide the result: a finished run is reused only when they are the same."""
        return [*self.own, *self.user]

    def overrides(self) -> list[str]:
        """What the run is composed with: its own, the placement, the user's, its output directory."""
        return [*self.own, *self.placement, *self.user, f"output_dir={self.out.resolve()}"]


def _read_record(out: Path) -> dict:
    try:
        return json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _finished(out: Path) -> bool:
    try:
        json.loads((out / "summary.json").read_text())
        return True
    except (OSError, ValueError):  # absent, or cut short by a kill while it was written
        return False


def _reduce(out: Path) -> dict:
    """A finished run's curves and figures."""
    from omegaconf import OmegaConf

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = json.loads((out / "evals.json").read_text())
    per_step = int(OmegaConf.load(out / "config.yaml").trainer.batch_size)  # trajectories trained on per step
    metrics = {}
    for key in PER_STEP:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        metrics[key] = statistics.mean(values) if values else None
    def median_of(key: str) -> float | None:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    memory = [r["memory/max_allocated_gib"] for r in rows if "memory/max_allocated_gib" in r]
    return {
        "eval": [{"step": e["step"], "trajectories": e["step"] * per_step, "reward": e["eval/reward"]} for e in evals],
        "train_reward": [r.get("reward/mean") for r in rows],
        "metrics": metrics,
        "final_eval": evals[-1]["eval/reward"], "base_eval": evals[0]["eval/reward"],
        "steps": len(rows), "trajectories_per_step": per_step,
        "step_s_median": median_of("time/step_s"), "train_s_median": median_of("time/train_s"),
        "critic_s_median": median_of("time/critic_s"),
        "trainer_memory_peak_gib": max(memory) if memory else None,
    }


def _child(spec_path: Path) -> int:
    """Single-run mode: compose the run's config, join the grid's Ray instance (RAY_ADDRESS), train."""
    spec = json.loads(spec_path.read_text())
    _die_with_parent(spec["grid_pid"])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bench import _compose

    from configs.schema import ConfigError
    from trainer.loop import run

    cfg = _compose(spec["overrides"])
    device = spec.get("cuda_visible_devices")
    if device is not None:
        # The grid's Ray instance counts --parallel logical GPUs on one GPU and leaves CUDA_VISIBLE_DEVICES
        # alone (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES): this job's actors are told which device it is.
        # trainer.cluster.connect keeps a connection made before run().
        import ray

        from trainer import cluster

        env = {**cluster.RUNTIME_ENV.get("env_vars", {}), "CUDA_VISIBLE_DEVICES": device}
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={**cluster.RUNTIME_ENV, "env_vars": env},
                 log_to_driver=True)
    try:
        run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ---- the GPU: shares of one device ------------------------------------------------------------

def _gpus() -> list[tuple[str, float]]:
    """(CUDA_VISIBLE_DEVICES id, memory in GiB) of the GPUs this process may use; none without a GPU.
    From nvidia-smi, so that this process opens no CUDA context (it would hold GPU memory all along)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        index, uuid, mib = (x.strip() for x in line.split(","))
        gpus.append((index, uuid, float(mib) / 1024))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(index, gib) for index, _, gib in gpus]
    chosen = []
    for want in (v.strip() for v in visible.split(",") if v.strip()):
        for index, uuid, gib in gpus:
            if want == index or uuid.startswith(want):
                chosen.append((want, gib))
    return chosen


def _share_overrides(share: float, gpu_gib: float) -> list[str]:
    """The overrides that fit a run into `share` of one GPU of `gpu_gib` GiB, beside the other runs.

    Trainer and engine colocated on the run's logical GPU (Ray's bundle for it is that whole logical
    GPU; the grid declares one per parallel run). The engine's KV cache is fixed (a quarter of the
    share): sized by vLLM from the GPU's free memory it would depend on what the other runs hold at that
    moment. gpu_memory_utilization is then only vLLM's start-up check (that much of the whole GPU free)."""
    return ["rollout.colocate=true", f"rollout.gpu_memory_utilization={share / 2:.4g}",
            f"rollout.kv_cache_gib={share * gpu_gib / 4:.3g}"]


# ---- the grid ---------------------------------------------------------------------------------

class Grid:
    def __init__(self, args, argv: list[str]) -> None:
        self.args = args
        self.argv = argv
        self.seeds = _ints(args.seeds, "--seeds")
        self.grid = _grid(args.experiment, _ints(args.etas, "--etas"))
        self.label = args.experiment if args.task is None else f"{args.experiment}-{args.task}"
        self.root = Path(args.out_dir)
        self.common = [*([f"task={args.task}"] if args.task else []), *COMMON]
        self.placement: list[str] = []
        self.share: float | None = None
        self.gpus: list[tuple[str, float]] = []
        self.cuda_device: str | None = None  # the one GPU the runs share (--gpu-share)
        self.ray_ready = self.ray_started = False
        self.t0 = time.time()
        self.sessions = self._previous_sessions()
        self.runs: list[Run] = []
        self.started_here = self.finished_here = self.failed_here = 0

    def _previous_sessions(self) -> list[dict]:
        """The wall times of the earlier commands that worked on this grid (from its JSON)."""
        try:
            return json.loads((self.root / f"{self.label}.json").read_text())["wall"]["sessions"]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    # ---- where the runs go: CPU, or shares of one GPU ---------------------------------------
    def place(self) -> None:
        args = self.args
        self.gpus = _gpus()
        share = args.gpu_share
        if share is not None and not self.gpus:
            raise SystemExit("error: --gpu-share needs a GPU and nvidia-smi found none; leave it out to run on CPU")
        if share is None and self.gpus and args.parallel > 1:
            share = 1.0 / args.parallel
        if share is None:
            return
        if not 0 < share <= 1:
            raise SystemExit(f"error: --gpu-share {share:g} must be in (0, 1]: the fraction of one GPU each run gets")
        if args.parallel * share > 1 + 1e-9:
            raise SystemExit(f"error: --parallel {args.parallel} runs of --gpu-share {share:g} need "
                             f"{args.parallel * share:g} GPUs and they share one; lower --parallel to "
                             f"{int(1 / share + 1e-9)} or --gpu-share to {math.floor(1000 / args.parallel) / 1000:g}")
        device, gib = self.gpus[0]
        self.share = share
        self.placement = _share_overrides(share, gib)
        if not os.environ.get("RAY_ADDRESS"):  # an existing cluster assigns its GPUs itself
            self.cuda_device = device
        log.info("GPU %s (%.0f GiB) shared by up to %d runs, %g of it each: %s%s", device, gib, args.parallel, share,
                 " ".join(self.placement),
                 " (the first visible GPU; CUDA_VISIBLE_DEVICES picks another)" if len(self.gpus) > 1 else "")

    # ---- plan -------------------------------------------------------------------------------
    def plan(self) -> None:
        """Every run of the grid: its config composed and checked (before anything starts), finished
        runs read back, interrupted ones cleared (or kept to resume from their checkpoint)."""
        from bench import _compose
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from configs.schema import ConfigError, validate

        for name, overrides in self.grid:
            for seed in self.seeds:
                run = Run(name, seed, self.root / self.label / f"{name}-seed{seed}",
                          [*self.common, *overrides, f"seed={seed}"], list(self.args.overrides), self.placement)
                try:
                    run.cfg = _compose(run.overrides())
                    validate(run.cfg)
                except ConfigError as e:
                    raise SystemExit(f"error: {e} (setting {name}, seed {seed})") from None
                except (HydraException, OmegaConfBaseException, ValueError) as e:  # an unknown key, a bad value
                    cause = " ".join(str(e).split())
                    raise SystemExit(f"error: the overrides of setting {name}: {cause} (the Hydra overrides go "
                                     "last on the command line; keys and values as in configs/schema.py)") from None
                self.runs.append(run)
        for run in self.runs:
            record = _read_record(run.out)
            if _finished(run.out):
                if record and record.get("identity") != run.identity:
                    raise SystemExit(
                        f"error: {run.out} was run with other overrides ({shlex.join(record.get('identity', []))}); "
                        "give the same overrides as then, another --out-dir, or remove that directory")
                run.status, run.wall_s, run.result = "finished", record.get("wall_s"), _reduce(run.out)
            elif run.out.exists():
                ck = run.cfg.checkpoint
                if (ck.enabled and ck.resume == "auto" and record.get("identity") == run.identity
                        and _latest_checkpoint(run.out) is not None):
                    log.info("%s was interrupted; it resumes from %s", run.key, _latest_checkpoint(run.out))
                else:
                    log.info("%s was interrupted (no summary.json); removing it to run it again", run.key)
                    shutil.rmtree(run.out)

    # ---- Ray --------------------------------------------------------------------------------
    def start_ray(self) -> None:
        """One Ray instance for every run of this command (their drivers join it through RAY_ADDRESS)."""
        import ray

        from trainer.cluster import cpus_needed

        parallel = self.args.parallel
        self.ray_ready = True
        if os.environ.get("RAY_ADDRESS"):
            log.info("the runs join the Ray cluster at RAY_ADDRESS=%s; it must have room for %d at once",
                     os.environ["RAY_ADDRESS"], parallel)
            return
        need = max(cpus_needed(r.cfg) for r in self.runs)
        # Ray's CPUs are logical (as in trainer.cluster.connect): the machine's cores, or what the runs ask for
        num_cpus = max(os.cpu_count() or 1, math.ceil(parallel * need - 1e-9))
        if self.share is not None:
            # One logical GPU per parallel run, all of them the one device: each run's colocated trainer and
            # engine take their logical GPU's bundle. Ray would set an actor's CUDA_VISIBLE_DEVICES to its
            # logical index (no such device past 0) and refuses more GPUs than CUDA_VISIBLE_DEVICES names, so
            # it is told to leave that variable alone and the runs give it to their actors (_child).
            os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            num_gpus = parallel
        else:
            num_gpus = None if self.gpus else 0  # None: Ray counts the GPUs
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 dashboard_host="127.0.0.1", log_to_driver=False)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        self.ray_started = True
        signal.signal(signal.SIGTERM, _on_sigterm)  # ray.init put in its own, which ends the process at once
        res = ray.cluster_resources()
        log.info("Ray instance of the grid at %s: %g CPUs, %g GPUs (a run asks for %g CPUs)",
                 os.environ["RAY_ADDRESS"], res.get("CPU", 0), res.get("GPU", 0), need)

    def stop_ray(self) -> None:
        if self.ray_started:
            import ray

            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)
            self.ray_started = False

    # ---- run --------------------------------------------------------------------------------
    def _typical_s(self) -> float | None:
        walls = [r.wall_s for r in self.runs if r.status == "finished" and r.wall_s]
        return statistics.median(walls) if walls else None

    def _start(self, run: Run) -> None:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / RUN_FILE, {
            "setting": run.name, "seed": run.seed, "identity": run.identity, "placement": run.placement,
            "overrides": run.overrides(), "cuda_visible_devices": self.cuda_device, "grid_pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        with open(run.out / "run.log", "ab") as console:
            run.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--run-spec",
                                         str((run.out / RUN_FILE).resolve())],
                                        stdout=console, stderr=subprocess.STDOUT, cwd=str(REPO),
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        run.status, run.started = "running", time.monotonic()
        self.started_here += 1
        log.info("start %s: %s", run.key, " ".join(run.identity[len(self.common):]))

    def _done(self, run: Run, rc: int) -> None:
        run.wall_s, run.proc = time.monotonic() - run.started, None
        if rc == 0 and _finished(run.out):
            write_json(run.out / RUN_FILE, {**_read_record(run.out), "wall_s": run.wall_s})
            run.status, run.result = "finished", _reduce(run.out)
            self.finished_here += 1
            log.info("done  %s: eval reward %.3f -> %.3f, %.0f s (%d of %d finished)", run.key,
                     run.result["base_eval"], run.result["final_eval"], run.wall_s,
                     sum(r.status == "finished" for r in self.runs), len(self.runs))
        else:
            run.status, run.error = "failed", _tail(run.out / "run.log")
            self.failed_here += 1
            log.error("FAILED %s (exit code %s) after %.0f s; its console, %s, ends:\n%s", run.key, rc, run.wall_s,
                      run.out / "run.log", run.error)

    @staticmethod
    def _stop(runs: list[Run], why: str) -> None:
        """Stop running runs (their drivers: Ray ends each job's actors with it); they stay pending and
        their directories are cleared by the next command."""
        for run in runs:
            run.proc.terminate()
        deadline = time.monotonic() + KILL_GRACE_S
        for run in runs:
            try:
                run.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()
            run.status, run.proc = "pending", None
            log.info("stopped %s (%s): pending", run.key, why)

    def _why_not_start(self, deadline: float | None) -> str | None:
        if self.failed_here >= 2 and not self.finished_here:
            return f"the first {self.failed_here} runs of this command failed"
        if deadline is None:
            return None
        left, typical = deadline - time.time(), self._typical_s()
        if left <= 0 or (typical is not None and left < typical):
            return f"{max(left, 0):.0f} s of --time-budget-s left and a run takes about {typical or 0:.0f} s"
        return None

    def execute(self) -> int:
        args = self.args
        todo = [r for r in self.runs if r.status != "finished"]
        log.info("%s: %d runs, %d finished before, %d to run, up to %d at once", self.label, len(self.runs),
                 len(self.runs) - len(todo), len(todo), args.parallel)
        deadline = self.t0 + args.time_budget_s if args.time_budget_s else None
        running: list[Run] = []
        stopped_because = None
        try:
            while todo or running:
                if deadline is not None and time.time() >= deadline and running:
                    stopped_because = f"--time-budget-s {args.time_budget_s:g} reached"
                    self._stop(running, stopped_because)
                    running.clear()
                    break
                while todo and len(running) < args.parallel and stopped_because is None:
                    stopped_because = self._why_not_start(deadline)
                    if stopped_because is None:
                        if not self.ray_ready:  # started only once a run may start
                            self.start_ray()
                        running.append(todo.pop(0))
                        self._start(running[-1])
                if not running:
                    break
                time.sleep(POLL_S)
                for run in [r for r in running if r.proc.poll() is not None]:
                    running.remove(run)
                    self._done(run, run.proc.returncode)
                    self.write()  # after every finished run: a grid stopped now keeps what it has
        except KeyboardInterrupt:
            self._stop(running, "interrupted")
            self.write()
            raise
        self.write()
        self.report(stopped_because)
        return 1 if any(r.status == "failed" for r in self.runs) else 0

    # ---- outputs ----------------------------------------------------------------------------
    def _results(self) -> dict[str, list[dict]]:
        results: dict[str, list[dict]] = {}
        for run in self.runs:
            if run.status == "finished":
                results.setdefault(run.name, []).append({
                    "seed": run.seed, "dir": str(run.out), "wall_s": run.wall_s, "overrides": run.identity,
                    "placement": _read_record(run.out).get("placement"), **run.result})
        return results

    def write(self) -> None:
        """The JSON, the table and the plot of what is finished so far."""
        results = self._results()
        table = summarise(results)
        sessions = list(self.sessions)
        if self.started_here:  # this command's wall time so far
            sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.t0)),
                             "wall_s": time.time() - self.t0, "parallel": self.args.parallel,
                             "gpu_share": self.share, "runs_started": self.started_here,
                             "runs_finished": self.finished_here})
        walls = [r.wall_s for r in self.runs if r.status == "finished" and r.wall_s]
        summary = {
            "experiment": self.args.experiment, "task": self.args.task,
            "command": shlex.join(["python", "scripts/fidelity.py", *self.argv]),
            "grid": {name: overrides for name, overrides in self.grid}, "common": self.common,
            "overrides": self.args.overrides, "placement": self.placement, "seeds": self.seeds,
            "table": table, "runs": results,
            "pending": [r.key for r in self.runs if r.status != "finished"],
            "running": [r.key for r in self.runs if r.status == "running"],
            "failed": {r.key: r.error for r in self.runs if r.status == "failed"},
            "wall": {"grid_s": sum(s["wall_s"] for s in sessions), "runs_s": sum(walls), "sessions": sessions},
        }
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / f"{self.label}.json", summary)
        (self.root / f"{self.label}.md").write_text(markdown(self.label, table, summary["pending"]))
        if results:
            plot(self.label, results, self.root / f"{self.label}.png")

    def report(self, stopped_because: str | None) -> None:
        for line in markdown("", summarise(self._results()), []).splitlines():
            log.info("%s", line)
        pending = [r.key for r in self.runs if r.status != "finished"]
        log.info("%d of %d runs finished; %s in %s", len(self.runs) - len(pending), len(self.runs),
                 ", ".join(f"{self.label}.{ext}" for ext in ("json", "md", "png")), self.root)
        failed = [r.key for r in self.runs if r.status == "failed"]
        if failed:
            log.error("failed: %s; each one's run.log says why; the same command runs them again", " ".join(failed))
        if pending:
            why = f" ({stopped_because})" if stopped_because else ""
            log.info("pending%s: %s; the same command continues the grid", why, " ".join(pending))


def _latest_checkpoint(out: Path):
    from trainer.checkpoint import latest

    return latest(out)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {option} {text!r} must be comma-separated integers, e.g. 0,1,2") from None


def _die_with_parent(grid_pid: int) -> None:
    """Have this run's process killed when the grid's process ends, however that ends: a run whose Ray
    instance went with the grid would otherwise wait for it forever, deaf to SIGTERM (Ray's client
    retries inside native code). Set here, after exec, not in the fork (the grid holds Ray's threads)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != grid_pid:  # the grid was gone before this was set
        os._exit(1)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the same clean-up as Ctrl-C: running runs stopped and left pending, outputs written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-spec"]:  # single-run mode, started by the grid
        return _child(Path(argv[1]))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=EXPERIMENTS)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (every setting runs each)")
    ap.add_argument("--etas", default="0,2,4,8,16", help="staleness experiment: the eta values")
    ap.add_argument("--task", choices=TASKS, default=None,
                    help="the task of every run (task=...; default: the config's, arithmetic); its runs go to "
                         "<out-dir>/<experiment>-<task>")
    ap.add_argument("--out-dir", default="benchmarks/fidelity")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once, each its own process on one Ray instance")
    ap.add_argument("--gpu-share", type=float, default=None,
                    help="fraction of the one GPU per run (default with a GPU: 1/--parallel)")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="stop starting runs when less than a typical run is left; stop running ones at the end")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after the grid's own)")
    args = ap.parse_intermixed_args(argv)  # options may follow the overrides
    if args.parallel < 1:
        ap.error(f"--parallel {args.parallel} must be >= 1")
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        ap.error(f"--time-budget-s {args.time_budget_s:g} must be > 0 seconds")
    grid = Grid(args, argv)
    grid.place()
    grid.plan()
    if all(r.status == "finished" for r in grid.runs):
        grid.write()
        grid.report(None)
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return grid.execute()
    except KeyboardInterrupt:
        log.info("interrupted: running runs stopped and left pending; the same command continues the grid")
        return 130
    finally:
        grid.stop_ray()


if __name__ == "__main__":
    sys.exit(main())
