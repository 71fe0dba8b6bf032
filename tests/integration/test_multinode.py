"""Two Ray nodes on this machine (tests/multinode_run.py, in its own process and cluster): the actors
spread over both, every publish verified; the second node is lost after step 2 and a replacement
joins: whatever it held (rollout workers, the trainer, or both) is restarted on the new node and the
run finishes every step once, with the accounting whole."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_lost_node_is_replaced_and_the_run_finishes(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "multinode_run.py"), str(tmp_path), tiny_model_dir],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    report_path = tmp_path / "multinode.json"
    assert report_path.exists(), (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(report_path.read_text())
    assert report["finished"] and report["error"] is None, (report, (proc.stdout + proc.stderr)[-4000:])
    held = report["lost_node_held"]
    assert report["alive_nodes_before"] == 2 and held["rollout_workers"] + held["trainers"] >= 1  # spread over both
    assert report["steps_logged"] == list(range(1, 7))  # each step once
    faults = report["faults"]
    assert faults["worker_restarts"] == held["rollout_workers"]
    assert faults["trainer_restarts"] == held["trainers"]
    assert report["verified_publishes"] >= 6
    acc = report["accounting"]
    assert acc["identity_holds"] and acc["running"] == 0 and acc["consumed"] == 6 * 8
