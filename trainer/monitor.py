"""Where the numbers go: the per-step row (docs/design.md section 7), metrics.jsonl, wandb (same names),
the console bar, sample tables, the end-of-run plot."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rollout.episode import episode_metrics

log = logging.getLogger(__name__)


def wandb_mode(configured: str | None) -> str:
    """online when configured so or when an API key is present, else offline (never asks for a login)."""
    if configured:
        return configured
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc()
    return "online" if has_key else "offline"


def _netrc() -> str:
    path = Path.home() / ".netrc"
    return path.read_text() if path.exists() else ""


@dataclass
class StepOutcome:
    """What one driver step produced, for its metrics row."""

    step: int
    metrics: dict  # the trainer's (rank 0's: sums over every rank)
    trained: list  # the trajectories trained on (ReMax baselines left out)
    lags: list[int]  # policy versions between each one's start and the weights it was trained from
    publish: dict  # the fleet's publish report
    worker_stats: list[dict]  # each rollout worker's counters
    dropped: int  # rollouts dropped so far, every reason
    faults: dict  # the fleet's fault counters
    wait_s: float  # waiting for the batch
    step_s: float  # the whole step: wait, train, publish
    generated_tokens: int  # tokens the engines generated during the step
    reward_model_s: float  # seconds the reward-model scorers spent scoring during the step (0 without them)
    cumulative_tokens_per_s: float  # consumed tokens per second since this process started training


def _reward_parts(trained: list) -> dict:
    """reward/<name>_mean of each reward the trajectories carry on its own (the rule reward as `task`, a reward
    model under rewards.model.name, its raw score), before weights and normalisation."""
    names = dict.fromkeys(k for t in trained for k in t.info.get("rewards", {}))
    return {f"reward/{k}_mean": sum(t.info["rewards"][k] for t in trained) / len(trained) for k in names}


class Monitor:
    def __init__(self, cfg, output_dir: Path, resolved_config: dict, resume: dict | None = None) -> None:
        """resume: {"step": N, "wandb_run_id": id} to continue a run from its checkpoint after step N:
        metrics.jsonl keeps its rows up to step N (later ones are redone) and wandb continues the run."""
        self.output_dir = output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.sample_every = cfg.logger.sample_every
        self.metrics_path = output_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        if resume is not None and self.metrics_path.exists():
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r["step"] <= resume["step"]]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._file = open(self.metrics_path, "a")
        self.wandb = None
        mode = wandb_mode(cfg.logger.wandb.mode)
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logger.wandb.project, entity=cfg.logger.wandb.entity, name=cfg.logger.wandb.name,
                mode=mode, dir=str(output_dir), config=resolved_config,
                id=resume["wandb_run_id"] if resume else None, resume="allow" if resume else None,
            )
            self.wandb.define_metric("*", step_metric="step")
        self.bar = None
        if cfg.logger.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.trainer.max_steps, initial=resume["step"] if resume else 0, desc="train",
                            unit="step", dynamic_ncols=True)

    def step_row(self, o: StepOutcome) -> dict:
        """The step's metrics row: the trainer's metrics, then staleness, rollout, rewards, faults, time."""
        pub = o.publish
        return {
            "step": o.step, "policy_version": o.step, **o.metrics,
            "staleness/lag_mean": sum(o.lags) / len(o.lags), "staleness/lag_min": min(o.lags),
            "staleness/lag_max": max(o.lags), "staleness/dropped": o.dropped,
            "rollout/tokens_per_s": o.generated_tokens / o.step_s,
            "rollout/interrupted": pub["interrupted"],
            # responses whose tokens came from more than one policy version (interrupted by a publish)
            "rollout/multi_version_frac": sum(len(set(t.versions)) > 1 for t in o.trained) / len(o.trained),
            "reward/errors": sum(s["reward_errors"] for s in o.worker_stats),
            "reward/model_errors": sum(s.get("reward_model_errors", 0) for s in o.worker_stats),
            **_reward_parts(o.trained),
            **episode_metrics(o.trained),
            "faults/worker_restarts": o.faults["worker_restarts"],
            "faults/trainer_restarts": o.faults["trainer_restarts"],
            "time/step_s": o.step_s, "time/rollout_wait_s": o.wait_s, "time/weight_sync_s": pub["seconds"],
            "time/publish_idle_s": pub["idle_s"],  # admission paused: the engines wait for the new weights
            "time/reward_model_s": o.reward_model_s,  # the scorers' busy time: their share of the step
            "weight_sync/bytes": pub["bytes"],
            "perf/consumed_tokens_per_s": sum(t.num_tokens for t in o.trained) / o.step_s,
            "perf/consumed_tokens_per_s_cumulative": o.cumulative_tokens_per_s,
        }

    def should_sample(self, step: int) -> bool:
        """Every logger.sample_every steps (0 = never)."""
        every = self.sample_every
        return bool(every) and step % every == 0

    def log(self, row: dict) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{row.get('reward/mean', 0):.2f}", lag=row.get("staleness/lag_max", 0),
                                 tok_s=f"{row.get('perf/consumed_tokens_per_s', 0):.0f}")

    def rewind(self, step: int) -> None:
        """Steps after `step` will be trained again (a trainer restarted from its checkpoint): their rows
        leave metrics.jsonl, so it holds each step once. wandb keeps what it was sent: against `step`,
        a redone step shows there twice."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self._file.close()
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._file = open(self.metrics_path, "a")
        if self.bar is not None:
            self.bar.n = len(self.rows)
            self.bar.refresh()

    def samples(self, step: int, trajs: list) -> None:
        """A table of (up to 8) sample completions: `samples.jsonl` and a wandb Table."""
        rows = [{"prompt_index": t.prompt_index, "response": t.info.get("text", ""), "reward": t.reward,
                 "versions": f"{min(t.versions, default=step - 1)}-{max(t.versions, default=step - 1)}"}
                for t in trajs[:8]]
        with open(self.output_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")
        if self.wandb is not None:
            import wandb

            columns = list(rows[0]) if rows else ["prompt", "response", "reward"]
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self.wandb.log({"step": step, "rollout/samples": table})

    @property
    def run_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def summary(self, values: dict) -> None:
        (self.output_dir / "summary.json").write_text(json.dumps(values, indent=1))
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_run(rows: list[dict], evals: list[dict], path: Path) -> Path:
    """PNG: train reward and eval reward per step (top), staleness lag per step (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(steps, [r["reward/mean"] for r in rows], label="train reward (mean of batch)")
    if evals:
        ax1.plot([e["step"] for e in evals], [e["eval/reward"] for e in evals], "o-", label="eval reward (greedy)")
    ax1.set_ylabel("reward")
    ax1.set_ylim(-0.02, 1.02)
    ax1.legend(loc="lower right")
    ax2.plot(steps, [r["staleness/lag_mean"] for r in rows], label="lag mean")
    ax2.plot(steps, [r["staleness/lag_max"] for r in rows], label="lag max")
    ax2.set_ylabel("staleness (versions)")
    ax2.set_xlabel("step")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
