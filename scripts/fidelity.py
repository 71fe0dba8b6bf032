"""Does it learn? The algorithm experiments of the README, one command each: a grid of training runs
(every setting stated in the run's config.yaml), a JSON of each run's curves, a summary table and a plot.

    python scripts/fidelity.py staleness --seeds 0,1            # coupled vs decoupled PPO at eta 0..16 (fixed lag)
    python scripts/fidelity.py invariance --seeds 0,1           # B = 16 with and without the rules vs B = 64
    python scripts/fidelity.py ewma --seeds 0,1                 # EWMA vs recomputed proximal policy at eta 4, 8
    python scripts/fidelity.py advantage --seeds 0,1            # ReMax vs GRPO vs RLOO at equal trajectories
    python scripts/fidelity.py staleness --etas 0,4 --seeds 0 trainer.max_steps=20   # a smaller grid; Hydra overrides last

Runs go to <out-dir>/<experiment>/<name>-seed<s>/ (metrics.jsonl, evals.json, config.yaml), the summary
to <out-dir>/<experiment>.json and the plot to <out-dir>/<experiment>.png. A run already finished there
is read back, not run again, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("fidelity")

# every run: the bundled model on its default task, no checkpoints, evaluation every 10 steps
COMMON = ["logger.wandb.mode=disabled", "logger.progress=false", "logger.sample_every=0",
          "checkpoint.enabled=false", "checkpoint.export_hf=false", "eval.every_steps=10"]


def _grid(experiment: str, etas: list[int]) -> list[tuple[str, list[str]]]:
    """(run name, overrides) of an experiment."""
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
        return [(adv, [f"algorithm.advantage={adv}"]) for adv in ("grpo", "rloo", "remax")]
    raise SystemExit(f"error: unknown experiment {experiment!r}; choose staleness, invariance, ewma or advantage")


def _run(overrides: list[str], out: Path) -> dict:
    """One training run (or the finished one already in `out`), reduced to its curves."""
    if not (out / "summary.json").exists():
        from bench import _compose  # scripts/ is on sys.path: this file runs as a script

        from trainer.loop import run

        cfg = _compose([*COMMON, *overrides, f"output_dir={out.resolve()}"])
        summary = run(cfg)
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "accounting"}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = json.loads((out / "evals.json").read_text())
    trajectories = _trajectories(out)
    return {
        "eval": [{"step": e["step"], "trajectories": e["step"] * trajectories, "reward": e["eval/reward"]} for e in evals],
        "train_reward": [r["reward/mean"] for r in rows],
        "clipfrac": statistics.mean(r["policy/clipfrac"] for r in rows),
        "lag_mean": statistics.mean(r["staleness/lag_mean"] for r in rows),
        "train_s_median": statistics.median(r["time/train_s"] for r in rows),
        "trainer_memory_peak_gib": max(r["memory/max_allocated_gib"] for r in rows),
        "final_eval": evals[-1]["eval/reward"], "base_eval": evals[0]["eval/reward"],
        "steps": len(rows),
    }


def _trajectories(out: Path) -> int:
    """Trajectories per step of a finished run (its trainer.batch_size)."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(out / "config.yaml").trainer.batch_size)


def _summarise(results: dict[str, list[dict]]) -> dict:
    """Per configuration: mean and spread over seeds of the final eval reward, and the other figures."""
    table = {}
    for name, runs in results.items():
        finals = [r["final_eval"] for r in runs]
        table[name] = {"final_eval_mean": statistics.mean(finals), "final_eval_min": min(finals),
                       "final_eval_max": max(finals), "base_eval": runs[0]["base_eval"], "seeds": len(runs),
                       "clipfrac_mean": statistics.mean(r["clipfrac"] for r in runs),
                       "lag_mean": statistics.mean(r["lag_mean"] for r in runs),
                       "train_s_median": statistics.median(r["train_s_median"] for r in runs),
                       "trainer_memory_peak_gib": max(r["trainer_memory_peak_gib"] for r in runs)}
    return table


def _plot(experiment: str, results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = "trajectories" if experiment in ("invariance", "advantage") else "step"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        xs = [p[x_key] for p in runs[0]["eval"]]
        curves = [[p["reward"] for p in r["eval"]] for r in runs]
        mean = [statistics.mean(v) for v in zip(*curves)]
        line, = ax.plot(xs, mean, marker="o", ms=3, label=f"{name} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(xs, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("trajectories consumed" if x_key == "trajectories" else "training step")
    ax.set_ylabel("eval reward (greedy, held-out)")
    ax.set_title(f"{experiment}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["staleness", "invariance", "ewma", "advantage"])
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (every configuration runs each)")
    ap.add_argument("--etas", default="0,2,4,8,16", help="staleness experiment: the eta values")
    ap.add_argument("--out-dir", default="benchmarks/fidelity")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after the grid's own)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = _grid(args.experiment, [int(e) for e in args.etas.split(",")])
    root = Path(args.out_dir)
    results: dict[str, list[dict]] = {}
    for name, overrides in grid:
        for seed in seeds:
            out = root / args.experiment / f"{name}-seed{seed}"
            log.info("== %s seed %d -> %s", name, seed, out)
            results.setdefault(name, []).append(_run([*overrides, f"seed={seed}", *args.overrides], out))
    table = _summarise(results)
    summary = {"experiment": args.experiment, "command": " ".join(["python", "scripts/fidelity.py", *(argv or sys.argv[1:])]),
               "grid": {name: overrides for name, overrides in grid}, "common": COMMON, "seeds": seeds,
               "table": table, "runs": results}
    (root / f"{args.experiment}.json").write_text(json.dumps(summary, indent=1))
    _plot(args.experiment, results, root / f"{args.experiment}.png")
    log.info("%-24s %8s %14s %9s %7s %9s", "config", "base", "final (min-max)", "clipfrac", "lag", "train_s")
    for name, row in table.items():
        log.info("%-24s %8.3f %6.3f (%.2f-%.2f) %9.4f %7.2f %9.2f", name, row["base_eval"], row["final_eval_mean"],
                 row["final_eval_min"], row["final_eval_max"], row["clipfrac_mean"], row["lag_mean"],
                 row["train_s_median"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
