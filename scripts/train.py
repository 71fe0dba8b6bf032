"""Train a policy with asynchronous RL on Ray.

    python scripts/train.py                                   # bundled SmolLM2-135M, arithmetic task, local Ray
    python scripts/train.py model=tiny trainer.max_steps=3    # seconds: a tiny random model
    python scripts/train.py -m staleness.max_staleness=0,4    # a sweep, one output directory per run
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402

from configs.schema import ConfigError, register  # noqa: E402

register()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg) -> None:
    from trainer.loop import run

    logging.basicConfig(level=cfg.logger.log_level, format="%(message)s", force=True)
    try:
        summary = run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    log = logging.getLogger("tether")
    log.info(
        "\ndone: %d steps | eval reward %.3f -> %.3f (best %.3f) | consumed %.0f tokens/s | max staleness %d\n"
        "      accounting: %s\n      outputs: %s",
        summary["steps"], summary["eval/reward_base"], summary["eval/reward_final"], summary["eval/reward_best"],
        summary["perf/consumed_tokens_per_s"], summary["staleness/lag_max_seen"],
        {k: summary["accounting"][k] for k in ("admitted", "consumed", "dropped", "in_flight")}, cfg.output_dir,
    )


if __name__ == "__main__":
    main()
