"""The reports of an experiment grid (scripts/fidelity.py): the table over seeds, its Markdown, the plot.

    table = summarise(results)            # per setting: final eval reward mean, std, min, max; per-step means;
                                          # step and trainer time, trainer memory
    markdown(label, table, pending)       # the table as Markdown
    plot(label, results, path)            # eval reward against steps and against trajectories consumed
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

# per-step metrics averaged over a run's steps when metrics.jsonl has them (older runs lack the first two)
PER_STEP = ("policy/behav_kl", "policy/behav_ess", "policy/behav_weight_capped_frac", "policy/clipfrac",
            "staleness/lag_mean")

# per run: medians over its steps of the step's and the trainer's time (the critic's part of it), and the
# trainer's peak memory (GPU: max allocated; CPU: the trainer process's peak resident set)
COST = ("step_s_median", "train_s_median", "critic_s_median", "trainer_memory_peak_gib")


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per setting: mean, standard deviation (over seeds, n - 1; null for one seed), min and max of the
    final eval reward, and the per-step metrics averaged over its runs."""
    table = {}
    for name, runs in results.items():
        finals = [r["final_eval"] for r in runs]
        row = {"seeds": len(runs), "final_eval_mean": statistics.mean(finals),
               "final_eval_std": statistics.stdev(finals) if len(finals) > 1 else None,
               "final_eval_min": min(finals), "final_eval_max": max(finals),
               "base_eval_mean": statistics.mean(r["base_eval"] for r in runs)}
        for key in PER_STEP:
            values = [r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]
            row[f"{key}_mean"] = statistics.mean(values) if values else None
        for key in COST:  # older runs lack some
            values = [r[key] for r in runs if r.get(key) is not None]
            row[f"{key}_mean"] = statistics.mean(values) if values else None
        walls = [r["wall_s"] for r in runs if r["wall_s"]]
        row["wall_s_mean"] = statistics.mean(walls) if walls else None
        table[name] = row
    return table


def markdown(label: str, table: dict, pending: list[str]) -> str:
    heads = ["setting", "seeds", "base", "final mean ± std", "min–max", "behav_kl", "behav_ess", "capped",
             "clipfrac", "lag", "step s", "train s", "critic s", "trainer GiB", "wall s"]
    lines = [f"| {' | '.join(heads)} |", "|" + " --- |" * len(heads)]
    for name, row in table.items():
        std = f" ± {row['final_eval_std']:.3f}" if row["final_eval_std"] is not None else ""
        cells = [name, str(row["seeds"]), f"{row['base_eval_mean']:.3f}", f"{row['final_eval_mean']:.3f}{std}",
                 f"{row['final_eval_min']:.3f}–{row['final_eval_max']:.3f}",
                 *(_num(row[f"{key}_mean"]) for key in PER_STEP),
                 *(_num(row.get(f"{key}_mean"), ".3g") for key in COST), _num(row["wall_s_mean"], ".0f")]
        lines.append(f"| {' | '.join(cells)} |")
    text = "\n".join(lines) + "\n"
    if pending:
        text += f"\npending ({len(pending)}): {' '.join(pending)}\n"
    return f"# {label}\n\n" + text if label else text


def _num(value, fmt: str = ".4g") -> str:
    return "–" if value is None else format(value, fmt)


def plot(label: str, results: dict[str, list[dict]], path: Path) -> None:
    """Eval reward against steps and against trajectories consumed: mean over seeds, band = +- one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, x_key, x_label in ((axes[0], "step", "training step"), (axes[1], "trajectories", "trajectories consumed")):
        for i, (name, runs) in enumerate(results.items()):
            n = min(len(r["eval"]) for r in runs)  # the seeds of a setting share their evaluation steps
            xs = [p[x_key] for p in runs[0]["eval"][:n]]
            curves = [[p["reward"] for p in r["eval"][:n]] for r in runs]
            mean = [statistics.mean(v) for v in zip(*curves)]
            line, = ax.plot(xs, mean, marker="o", ms=3, color=f"C{i % 10}", label=f"{name} (n={len(runs)})")
            if len(runs) > 1:
                std = [statistics.stdev(v) for v in zip(*curves)]
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval reward (greedy, held-out)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{label}: mean over seeds, band = ± 1 std")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    """Written whole or not at all: a kill mid-write leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
