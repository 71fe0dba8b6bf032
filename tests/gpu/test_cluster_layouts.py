"""GPU: the automatic settings and the layouts of trainer/cluster.py in real runs of scripts/train.py.

    python -m pytest -q -m gpu tests/gpu/test_cluster_layouts.py     # on a 2-GPU machine

* Plain `scripts/train.py` (no GPU option given) on the machine's GPUs: a bfloat16 engine with CUDA
  graphs, one GPU per actor (colocated with CUDA IPC on one GPU, NCCL between two), stated in the
  start line and saved in config.yaml; every publish verified bitwise.
* Two FSDP2 trainer ranks on two GPUs with the engine beside rank 1
  (`trainer.num_workers=2 trainer.num_gpus=0.5 rollout.num_gpus=0.5`): NCCL joins rank 0 and the
  engine across GPUs; every publish verified bitwise.

Both train the tiny random model (its tokenizer from the project cache), or, with
TETHER_GPU_MODEL_DIR set (a machine without the package registry), that converted SmolLM2
directory as `model=hf model.path=...`, as the other GPU tests do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")
pytestmark = [pytest.mark.gpu, pytest.mark.vllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = os.environ.get("TETHER_GPU_MODEL_DIR")  # see tests/gpu/conftest.py
MODEL = ["model=hf", f"model.path={MODEL_DIR}"] if MODEL_DIR else ["model=tiny"]
COMMON = [*MODEL, "trainer.max_steps=3", "trainer.batch_size=8", "trainer.group_size=4",
          "task.num_eval=4", "weight_sync.verify=true", "logger.wandb.mode=disabled", "logger.progress=false",
          "checkpoint.enabled=false"]


def _train(args: list[str], out: Path) -> tuple[str, dict, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run = subprocess.run([sys.executable, str(REPO / "scripts/train.py"), *args, f"output_dir={out}"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=1200)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    return log, yaml.safe_load((out / "config.yaml").read_text()), json.loads((out / "summary.json").read_text())


def test_plain_command_picks_the_gpu_settings(tmp_path):
    log, cfg, summary = _train(COMMON, tmp_path)
    gpus = torch.cuda.device_count()
    assert cfg["model"]["dtype"] == "bfloat16" and cfg["rollout"]["enforce_eager"] is False
    assert cfg["rollout"]["kv_cache_gib"] is None
    assert cfg["rollout"]["num_gpus"] == 1.0 and cfg["trainer"]["num_gpus"] == 1.0
    assert cfg["rollout"]["colocate"] is (gpus == 1)
    assert cfg["weight_sync"]["backend"] == ("ipc" if gpus == 1 else "nccl")
    start = next(line for line in log.splitlines() if line.startswith("Ray cluster: "))
    assert "model.dtype=bfloat16" in start and "rollout.enforce_eager=false" in start
    assert summary["verified_publishes"] == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_fsdp_ranks_on_two_gpus_with_the_engine_beside_rank_1(tmp_path):
    log, cfg, summary = _train([*COMMON, "trainer.num_workers=2", "trainer.num_gpus=0.5", "rollout.num_gpus=0.5"],
                               tmp_path)
    start = next(line for line in log.splitlines() if line.startswith("Ray cluster: "))
    assert "(GPU 0: trainer rank 0; GPU 1: trainer rank 1, engine 0); weight sync nccl" in start
    assert cfg["weight_sync"]["backend"] == "nccl" and cfg["trainer"]["fsdp"] is None
    assert summary["verified_publishes"] == 3  # the engine on GPU 1 serves rank 0's weights, bit for bit
