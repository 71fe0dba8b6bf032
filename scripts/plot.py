"""Plot one or more runs: reward, staleness, throughput and time per step, runs overlaid.

    python scripts/plot.py "$(ls -d outputs/20*/*/ | tail -1)"          # the latest run -> <its dir>/plots.png
    python scripts/plot.py /tmp/run_sync /tmp/run_async --out cmp.png   # two runs (output_dir=...) overlaid
    python scripts/plot.py outputs/multirun/*/*/* --out sweep.png       # every run of the Hydra sweeps

Reads each directory's metrics.jsonl (one JSON object per step), evals.json if present
(eval rewards, else the `eval/reward` values in metrics.jsonl) and config.yaml if present
(a run is labelled `max_staleness=<n>` from it, else by its directory name). Metrics a run
did not log are left out of its curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("tether.plot")

# (metric, line style, legend text) per panel; colour tells the runs apart
REWARD = [("reward/mean", "-", "train (batch mean)"), ("reward/task_mean", "--", "rule (task) reward"),
          ("reward/rm_mean", ":", "reward model, raw score")]
STALENESS = [("staleness/lag_mean", "-", "lag mean"), ("staleness/lag_max", "--", "lag max")]
THROUGHPUT = [("perf/consumed_tokens_per_s", "-", "consumed (trained on)"),
              ("rollout/tokens_per_s", "--", "generated (rollout)")]
TIME = [("time/step_s", "-", "step"), ("time/rollout_wait_s", "--", "rollout wait"),
        ("time/train_s", ":", "train"), ("time/weight_sync_s", "-.", "weight sync")]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = []
    for directory in args.dirs:
        if not (directory / "metrics.jsonl").is_file():
            log.error("error: %s has no metrics.jsonl; pass a run's output_dir", directory)
            return 2
        runs.append(load_run(directory))
    _disambiguate(runs)
    out = args.out or args.dirs[0] / "plots.png"
    plot(runs, out)
    log.info("wrote %s (%d run%s)", out, len(runs), "" if len(runs) == 1 else "s")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run output directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write; default <first dir>/plots.png")
    return parser.parse_args(argv)


def load_run(directory: Path) -> dict:
    """{"label", "rows" (metrics per step), "evals" ([(step, eval reward)])} of one run directory."""
    rows = []
    for lineno, line in enumerate((directory / "metrics.jsonl").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a run still writing may leave half a line
            log.warning("%s/metrics.jsonl line %d is not JSON; skipped", directory, lineno)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return {"label": _label(directory), "dir": directory, "rows": rows, "evals": _evals(directory, rows)}


def _evals(directory: Path, rows: list[dict]) -> list[tuple[float, float]]:
    path = directory / "evals.json"
    entries = rows
    if path.is_file():
        try:
            entries = json.loads(path.read_text())
        except ValueError:
            log.warning("%s is not JSON; using eval/reward from metrics.jsonl", path)
    points = [(e["step"], e["eval/reward"]) for e in entries
              if isinstance(e, dict) and _is_number(e.get("step")) and _is_number(e.get("eval/reward"))]
    return sorted(points)


def _label(directory: Path) -> str:
    config = directory / "config.yaml"
    if config.is_file():
        import yaml

        try:
            staleness = (yaml.safe_load(config.read_text()) or {}).get("staleness") or {}
            if "max_staleness" in staleness:
                return f"max_staleness={staleness['max_staleness']}"
        except (yaml.YAMLError, AttributeError, TypeError):
            log.warning("%s is not a YAML mapping; labelling the run by its directory", config)
    return directory.resolve().name


def _disambiguate(runs: list[dict]) -> None:
    """Two runs with the same label (two sweeps, same max_staleness) get their directory appended."""
    labels = [r["label"] for r in runs]
    for run in runs:
        if labels.count(run["label"]) > 1 and run["label"] != run["dir"].resolve().name:
            run["label"] = f"{run['label']} ({run['dir'].resolve().name})"


def plot(runs: list[dict], out: Path) -> Path:
    """One PNG, four panels (reward, staleness, throughput, time per step), runs overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = [(axes[0, 0], REWARD, "reward"), (axes[0, 1], STALENESS, "staleness (policy versions)"),
              (axes[1, 0], THROUGHPUT, "throughput (tokens/s)"), (axes[1, 1], TIME, "time per step (s)")]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for ax, series, _ in panels:
            for key, style, _ in series:
                steps, values = _series(run["rows"], key)
                if steps:
                    ax.plot(steps, values, style, color=color)
        if run["evals"]:
            steps, values = zip(*run["evals"])
            axes[0, 0].plot(steps, values, "o", color=color, markersize=5)

    for ax, series, ylabel in panels:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        styles = [Line2D([], [], color="gray", linestyle=style, label=text) for _, style, text in series]
        if ax is axes[0, 0]:
            styles.append(Line2D([], [], color="gray", marker="o", linestyle="", label="eval (greedy)"))
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.legend(handles=styles, loc="best", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    run_handles = [Line2D([], [], color=colors[i % len(colors)], linewidth=3, label=r["label"]) for i, r in enumerate(runs)]
    fig.legend(handles=run_handles, loc="upper center", ncol=min(len(runs), 6), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r.get("step", i + 1), r[key]) for i, r in enumerate(rows) if _is_number(r.get(key))]
    return ([s for s, _ in points], [v for _, v in points]) if points else ([], [])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


if __name__ == "__main__":
    sys.exit(main())
