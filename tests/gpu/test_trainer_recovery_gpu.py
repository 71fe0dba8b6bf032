"""GPU: a trainer rank lost under NCCL. Two FSDP2 ranks on two GPUs with the engine beside rank 1
(`trainer.num_workers=2 trainer.num_gpus=0.5 rollout.num_gpus=0.5`, NCCL between the ranks and to the
engine); rank 1's process SIGKILLed mid-run. Rank 0 may then block inside an NCCL collective (NCCL does
not fail fast where gloo does): the driver sees rank 1 die and kills rank 0, both ranks start again from
the checkpoint, every publish after it verified, every step once in metrics.jsonl. Bounded: the run must
finish within ten minutes.

    python -m pytest -q -m gpu tests/gpu/test_trainer_recovery_gpu.py     # on a 2-GPU machine
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def test_a_rank_lost_under_nccl_restarts_both_ranks(tmp_path, gpu_model_dir):
    from tests.conftest import compose
    from tests.helpers import metric_rows
    from tests.integration.test_faults import _Background, _trainer_pids, kill_rank_mid_run

    out, steps, batch = tmp_path / "run", 8, 16
    cfg = compose(["model=hf", f"model.path={gpu_model_dir}", "trainer.num_workers=2", "trainer.num_gpus=0.5",
                   "rollout.num_gpus=0.5", f"trainer.max_steps={steps}", f"trainer.batch_size={batch}",
                   "trainer.group_size=4", "checkpoint.every_steps=2", "weight_sync.verify=true",
                   "weight_sync.timeout_s=60", "task.num_eval=4", "logger.wandb.mode=disabled", "logger.progress=false",
                   "checkpoint.export_hf=false", f"output_dir={out}"], cluster_gpus=torch.cuda.device_count())
    pid, summary = kill_rank_mid_run(_Background(cfg), out, rank=1)  # its own local Ray: the layout asks for 3 CPUs
    faults = summary["faults"]
    assert [r["step"] for r in metric_rows(out)] == list(range(1, steps + 1))
    assert faults["trainer_restarts"] == 1 and faults["recovery_publishes_verified"] == 1
    assert pid not in _trainer_pids()
    acc = json.loads((out / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["consumed"] == steps * batch
