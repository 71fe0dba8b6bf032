"""The controller loop: build a run from the config, then take a batch, train, publish, log, evaluate,
checkpoint, until trainer.max_steps.

    summary = run(cfg)                       # scripts/train.py: build, set up, (resume,) train, close
    run_ = build_run(cfg)                    # the same run, built for a benchmark that drives it itself

Rollout workers generate continuously; this loop only takes batches from the staleness service,
trains on them, and publishes the new weights. Who owns the actors and what happens when one dies
is trainer/fleet.py; when to evaluate, checkpoint and sample is asked of the components that do it
(`evaluator.should_evaluate(step)`, `checkpointer.should_save(step)`, `monitor.should_sample(step)`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from omegaconf import OmegaConf

from configs.schema import ConfigError, validate
from rewards.tasks import build_task, resolve_data_path
from rollout.episode import build_env
from rollout.models import resolve_model_dir
from trainer import checkpoint, cluster
from trainer.checkpoint import Checkpointer
from trainer.fleet import Fleet
from trainer.invariance import effective_hparams
from trainer.monitor import Monitor, StepOutcome, plot_run

log = logging.getLogger("tether")


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last finite weights was written."""


@dataclass
class Progress:
    """The driver's counters that a checkpoint carries: evaluations so far, tokens consumed, the largest lag."""

    evals: list[dict] = field(default_factory=list)
    consumed_tokens: int = 0
    max_lag: int = 0

    def state_dict(self) -> dict:
        return {"evals": self.evals, "consumed_tokens": self.consumed_tokens, "max_lag": self.max_lag}

    def load_state_dict(self, state: dict) -> None:
        self.evals, self.consumed_tokens, self.max_lag = state["evals"], state["consumed_tokens"], state["max_lag"]


class Evaluator:
    """Greedy evaluation on the held-out prompts, sharded over the rollout workers."""

    def __init__(self, cfg, fleet: Fleet, num_eval: int) -> None:
        self.cfg, self.fleet, self.num_eval = cfg, fleet, num_eval

    def should_evaluate(self, step: int) -> bool:
        """Every eval.every_steps steps, but not at the last one (the final evaluation follows the run)."""
        every = self.cfg.eval.every_steps
        return bool(every) and step % every == 0 and step < self.cfg.trainer.max_steps

    def evaluate(self, step: int) -> dict:
        workers = self.fleet.workers
        shards = [list(range(i, self.num_eval, len(workers))) for i in range(len(workers))]
        results = [r for rs in ray.get([w.evaluate.remote(s, self.cfg.eval.max_new_tokens)
                                        for w, s in zip(workers, shards) if s]) for r in rs]
        results.sort(key=lambda r: r["index"])
        return {"step": step, "eval/reward": sum(r["reward"] for r in results) / len(results), "samples": results[:4]}


class Run:
    def __init__(self, cfg, model_dir: str, layout: dict, placement: cluster.Placement, task) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.output_dir = Path(cfg.output_dir)
        self.monitor: Monitor | None = None  # set by build_run once the actors exist
        self.fleet = Fleet(cfg, model_dir, layout, placement, num_prompts=len(task.train))
        self.evaluator = Evaluator(cfg, self.fleet, len(task.eval))
        self.checkpointer = Checkpointer(cfg, self.fleet, self.output_dir)
        self.progress = Progress()
        self.start_step = 0
        self.version = 0  # weight versions published
        self.run_tokens = 0  # consumed tokens of this process's training (not of a resumed run's earlier steps)
        self.gen_before = 0  # the rollout workers' generated-token counters at the last step
        self.scoring_before = 0.0  # the reward-model scorers' busy seconds at the last step
        self.initial_service_state: dict = {}

    def setup(self) -> None:
        self.fleet.setup(self.output_dir)

    def publish(self, version: int, save: bool = False) -> dict:
        """Version `version` to every engine (trainer/fleet.py); with `save`, a checkpoint written while
        admission is paused (`pub["checkpoint"]`; it counts once the checkpointer committed it)."""
        pub = self.fleet.publish(version, checkpoint=(lambda: self.checkpointer.write(version)) if save else None)
        self.version = version
        return pub

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: trainer state on every rank, the data cursor and counters, then
        the restored weights to every engine (version = the checkpoint's step) before any sample."""
        state = self.checkpointer.load(path)
        self.start_step = state["step"]
        self.progress.load_state_dict(state)
        self.publish(self.start_step)  # the restored weights, to every engine, before any sample
        log.info("resumed from %s: next step %d", path, self.start_step + 1)

    def export(self) -> Path:
        out = self.output_dir / "hf"
        self.fleet.all_trainers("export_hf", str(out), self.model_dir)
        log.info("final policy exported to %s", out)
        return out

    # ---- training ----------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        _log_derived_hparams(cfg)
        if not self.progress.evals:
            self.progress.evals = [self.evaluator.evaluate(0)]
            log.info("eval before training: reward %.3f", self.progress.evals[0]["eval/reward"])
        self.initial_service_state = self.fleet.service_snapshot()  # a trainer lost before any checkpoint
        self.fleet.start_generation()
        t_start = time.perf_counter()
        step = self.start_step + 1
        while step <= cfg.trainer.max_steps:
            try:
                self._train_step(step, t_start)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                # a dead rank, or a live rank whose collective broke with it
                if not self.fleet.trainer_lost():
                    raise
                step = self._recover_trainers(e, step)
            step += 1
        train_time = time.perf_counter() - t_start
        self.fleet.check_workers(self.version)  # the final eval needs every engine
        self.fleet.stop_generation()
        self.progress.evals.append(self.evaluator.evaluate(cfg.trainer.max_steps))
        accounting = self.fleet.accounting(self.version)
        (self.output_dir / "accounting.json").write_text(json.dumps(accounting, indent=1))
        if not accounting["identity_holds"]:
            raise RuntimeError(f"trajectory accounting does not add up: {accounting}")
        evals = self.progress.evals
        (self.output_dir / "evals.json").write_text(json.dumps(evals, indent=1))
        plot_run(self.monitor.rows, evals, self.output_dir / "reward_staleness.png")
        exported = str(self.export()) if cfg.checkpoint.export_hf else None
        return {
            "eval/reward_base": evals[0]["eval/reward"], "eval/reward_final": evals[-1]["eval/reward"],
            "eval/reward_best": max(e["eval/reward"] for e in evals), "steps": cfg.trainer.max_steps,
            "resumed_from_step": self.start_step,
            "perf/consumed_tokens_per_s": self.run_tokens / train_time if self.run_tokens else 0.0,
            "staleness/lag_max_seen": self.progress.max_lag,
            "train_time_s": train_time, "accounting": accounting, "verified_publishes": self.fleet.verified_publishes,
            "exported_to": exported, "faults": dict(self.fleet.faults),
        }

    def _train_step(self, step: int, t_start: float) -> None:
        """Take a batch, train, publish (checkpoint), log, evaluate."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = self.fleet.next_batch(self.version)
        wait_s = time.perf_counter() - t0
        trained = [t for t in batch if not t.is_baseline]  # ReMax baselines are not trained on
        metrics = self.fleet.all_trainers("train_step", ray.put(batch))  # one copy in the object store for every rank
        give_up = metrics["train/skipped_in_a_row"] >= cfg.trainer.max_skipped_steps
        save = self.checkpointer.should_save(step, give_up)
        pub = self.publish(step, save=save)
        step_s = time.perf_counter() - t0
        lags = [step - 1 - t.start_version for t in trained]  # trained from the weights of version step - 1
        tokens = sum(t.num_tokens for t in trained)
        self.progress.consumed_tokens += tokens
        self.progress.max_lag = max(self.progress.max_lag, max(lags))
        self.run_tokens += tokens
        stats = self.fleet.worker_stats(self.version)
        generated = sum(s["generated_tokens"] for s in stats)
        scoring = self.fleet.scorer_seconds() if self.fleet.scorers else 0.0
        row = self.monitor.step_row(StepOutcome(
            step=step, metrics=metrics, trained=trained, lags=lags, publish=pub, worker_stats=stats,
            dropped=self.fleet.dropped_total(), faults=dict(self.fleet.faults), wait_s=wait_s, step_s=step_s,
            generated_tokens=max(generated - self.gen_before, 0),  # a restarted worker's count starts again
            reward_model_s=max(scoring - self.scoring_before, 0.0),
            cumulative_tokens_per_s=self.run_tokens / (time.perf_counter() - t_start)))
        self.gen_before, self.scoring_before = generated, scoring
        if self.evaluator.should_evaluate(step):
            self.progress.evals.append(self.evaluator.evaluate(step))
            row["eval/reward"] = self.progress.evals[-1]["eval/reward"]
        self.monitor.log(row)
        if pub["checkpoint"] is not None:  # its step's row is in metrics.jsonl: now it counts
            self.checkpointer.commit(pub["checkpoint"], self.progress.state_dict(), self.monitor.run_id)
        if self.monitor.should_sample(step):
            self.monitor.samples(step, trained)
        if give_up:
            raise TrainingDiverged(
                f"{metrics['train/skipped_in_a_row']} optimizer steps in a row had a non-finite loss or gradient "
                f"(trainer.max_skipped_steps={cfg.trainer.max_skipped_steps}); stopped after step {step}. "
                + (f"The checkpoint in {checkpoint.root(self.output_dir)} holds the last finite weights: " if save
                   else "No checkpoint was written (checkpoint.enabled=false): ")
                + "lower trainer.lr or raise trainer.grad_clip, then resume with checkpoint.resume=auto")

    def _recover_trainers(self, error: Exception, step: int) -> int:
        """A trainer rank died during `step`: the fleet restarts the trainers from the latest complete
        checkpoint (or the initial weights) and rolls generation back to it; the driver's counters and
        metrics.jsonl go back with it. Returns the step to continue after."""
        path = self.checkpointer.latest()
        state = checkpoint.driver_state(path) if path is not None else None
        back_to = self.fleet.recover_trainers(error, step, path,
                                              state["service"] if state else self.initial_service_state)
        if state is not None:
            self.progress.load_state_dict(state)
        else:  # no checkpoint yet: back to the evaluation before training
            self.progress = Progress(evals=self.progress.evals[:1])
        self.version = back_to
        self.monitor.rewind(back_to)
        return back_to

    def close(self) -> None:
        self.fleet.close()


def _log_derived_hparams(cfg) -> None:
    hp = effective_hparams(cfg)
    if cfg.batch_invariance.reference_batch_size is not None:
        log.info("batch-size invariance: B_ref=%d, B=%d, c=%.4g per optimizer update, %.4g per step -> lr %.4g, "
                 "adam betas (%.6g, %.6g), EWMA decay %.6g (centre of mass %.3g updates), advantage-norm span %s",
                 cfg.batch_invariance.reference_batch_size, cfg.trainer.batch_size, hp["c"], hp["c_batch"], hp["lr"],
                 *hp["adam_betas"], hp["ewma_decay"], hp["ewma_center_of_mass_steps"], hp["adv_norm_span"])
    if cfg.algorithm.proximal == "ewma":
        log.info("EWMA proximal policy: decay %.6g, centre of mass %.3g optimizer steps",
                 hp["ewma_decay"], hp["ewma_center_of_mass_steps"])


def build_run(cfg) -> tuple[Run, Path | None]:
    """Validate the config, connect to Ray, build every actor of the run and its monitor; the checkpoint
    to resume from (or None). Raises ConfigError for bad input, before any actor starts."""
    validate(cfg)
    # actors may run in another working directory (or on another node): absolute paths only
    cfg.task.path = resolve_data_path(cfg.task.path)
    cfg.task.eval_path = resolve_data_path(cfg.task.eval_path)
    cfg.rewards.model.path = resolve_data_path(cfg.rewards.model.path)
    try:
        effective_hparams(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    task = build_task(cfg.task)  # a task that cannot be built is a config error, before any actor starts
    if cfg.env is not None:
        try:
            build_env(cfg.env)  # likewise an environment whose constructor fails
        except Exception as e:
            raise ConfigError(f"env={OmegaConf.to_container(cfg.env)} could not be built ({type(e).__name__}: {e}); "
                              "fix its arguments") from None
    model_dir = str(resolve_model_dir(cfg.model.name, cfg.model.path, cfg.cache_dir))
    try:
        resume_from = checkpoint.resolve(cfg.checkpoint.resume, cfg.output_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    # connect, give the automatic settings their values for this cluster (logged in one line),
    # check the rules between them and that the cluster can host the actors
    layout, placement = cluster.prepare(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # the resolved values
    # the actors first: a second run writing to this output_dir fails here, before metrics.jsonl is touched
    run_ = Run(cfg, model_dir, layout, placement, task)
    resume = checkpoint.driver_state(resume_from) if resume_from else None
    try:
        run_.monitor = Monitor(cfg, output_dir, OmegaConf.to_container(cfg, resolve=True), resume=resume)
    except BaseException:
        run_.close()
        raise
    return run_, resume_from


def run(cfg) -> dict:
    """Build, set up, (resume,) train, summarise; every actor is closed on the way out."""
    run_, resume_from = build_run(cfg)
    try:
        run_.setup()
        if resume_from:
            run_.restore(resume_from)
        summary = run_.train()
        run_.monitor.summary({k: v for k, v in summary.items() if k != "accounting"})
        return summary
    finally:
        run_.monitor.close()
        run_.close()
