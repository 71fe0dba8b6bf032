"""A two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and a worker node, each a
raylet with its own CPUs), a tether run spread over both, and the worker node lost after step 2 with a
replacement joining. Run as a script (its own Ray cluster, outside the test session's instance):

    python tests/multinode_run.py OUTPUT_DIR MODEL_DIR

Writes OUTPUT_DIR/multinode.json: what lived on the lost node, the run's summary and every node seen."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _titled(pids: set[int], prefix: str) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmd[:1] and cmd[0].startswith(prefix):
            out.append(pid)
    return out


def main(out: str, model_dir: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from tests.conftest import compose
    from trainer.loop import run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    second = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    out_dir = Path(out) / "run"
    steps = 6
    cfg = compose([
        "model=tiny", f"model.path={model_dir}", "rollout.engine=hf", f"ray.address={cluster.address}",
        # 3 CPUs asked, 2 per node: the actors must spread over both nodes
        "rollout.num_workers=2", "rollout.num_cpus=1", "trainer.num_cpus=1", "rollout.max_restarts=2",
        "rollout.max_new_tokens=8", "rewards.num_workers=1", "task.num_eval=4", "eval.max_new_tokens=4",
        "trainer.batch_size=8", "trainer.group_size=4", f"trainer.max_steps={steps}", "staleness.max_staleness=2",
        "checkpoint.every_steps=2", "checkpoint.export_hf=false", "weight_sync.verify=true",
        "weight_sync.timeout_s=60", "logger.wandb.mode=disabled", "logger.progress=false", f"output_dir={out_dir}",
    ])
    result: dict = {}

    def target():
        try:
            result["summary"] = run(cfg)
        except BaseException as e:  # noqa: BLE001 - reported in the JSON
            result["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and thread.is_alive():
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    raylet = second.all_processes["raylet"][0].process.pid
    on_second = _descendants(raylet)
    lost = {"rollout_workers": len(_titled(on_second, "ray::RolloutWorker")),
            "trainers": len(_titled(on_second, "ray::TrainerWorker"))}
    nodes_before = len([n for n in ray.nodes() if n["Alive"]])
    cluster.remove_node(second)  # its raylet and every process under it: the node is gone
    cluster.add_node(num_cpus=2)  # a replacement joins
    thread.join(timeout=max(deadline - time.monotonic(), 1))
    summary = result.get("summary") or {}
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    accounting = json.loads((out_dir / "accounting.json").read_text()) if (out_dir / "accounting.json").exists() else {}
    Path(out, "multinode.json").write_text(json.dumps({
        "finished": not thread.is_alive(), "error": result.get("error"), "lost_node_held": lost,
        "alive_nodes_before": nodes_before, "steps_logged": [r["step"] for r in rows],
        "faults": summary.get("faults"), "verified_publishes": summary.get("verified_publishes"),
        "accounting": accounting,
    }, indent=1))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
