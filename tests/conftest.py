"""Shared fixtures: the tiny model, a composed Hydra config, one local Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from rollout.models import prepare_tiny

    return str(prepare_tiny())


def compose(overrides: list[str], cluster_gpus: float | None = None):
    """The config scripts/train.py would see with these overrides. With `cluster_gpus`, its automatic
    settings get the values trainer.loop.run gives them on a Ray cluster with that many GPUs (for
    tests that build actors without run())."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from configs.schema import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    if cluster_gpus is not None:
        from trainer.cluster import resolve

        resolve(cfg, cluster_gpus)
    return cfg


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}})
    yield ray
    ray.shutdown()
