"""Train a Bradley-Terry reward model on preference pairs; the result is what rewards.model.path takes.

    python scripts/make_preferences.py                                                   # pairs from the bundled model's answers
    python scripts/train_rm.py data.path=data/preferences/train.jsonl data.eval_path=data/preferences/eval.jsonl
    python scripts/train_rm.py model=tiny data.path=rewards/data/preferences_example.jsonl trainer.max_steps=3   # seconds
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402

from configs.rm_schema import register_rm  # noqa: E402
from configs.schema import ConfigError, register  # noqa: E402

register()
register_rm()


@hydra.main(version_base=None, config_path="../configs", config_name="rm")
def main(cfg) -> None:
    from trainer.rm_train import train_reward_model

    logging.basicConfig(level=cfg.logger.log_level, format="%(message)s", force=True)
    try:
        summary = train_reward_model(cfg)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    logging.getLogger("tether").info(
        "\ndone: %d steps on %d pairs | held-out pair accuracy %.3f -> %.3f (%d pairs), margin %.3f\n      reward model: %s",
        summary["steps"], summary["train_pairs"], summary["eval_accuracy_before"], summary["eval_accuracy"],
        summary["eval_pairs"], summary["eval_margin"], summary["exported_to"])


if __name__ == "__main__":
    main()
