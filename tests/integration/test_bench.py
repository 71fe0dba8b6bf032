"""scripts/bench.py pipeline end to end on CPU with the tiny model and tiny forced lengths: every field
of its JSON is there and positive, the ratios are the quotients of its own numbers, the effective
throughput is consumed tokens / training wall time, and every system trained on the same tokens."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH, GROUP = 3, 8, 4
TINY = ["model=tiny", "rollout.engine=hf", "rollout.forced_length_median=8", "rollout.forced_length_max=16",
        "rollout.max_new_tokens=16", f"trainer.max_steps={STEPS}", f"trainer.batch_size={BATCH}",
        f"trainer.group_size={GROUP}", "trainer.micro_batch_size=4", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5",
        "rewards.num_workers=1", "rollout.max_concurrent_groups=2", "task.num_eval=2", "eval.max_new_tokens=4"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_pipeline_bench_tiny(tmp_path, ray_local, tiny_model_dir):
    out = tmp_path / "bench.json"
    argv = ["pipeline", "--out", str(out), "--workdir", str(tmp_path / "runs"), "--trainer-steps", "2",
            "--repeats", "3", *TINY]
    assert _bench().main(argv) == 0
    result = json.loads(out.read_text())
    systems, ratios = result["systems"], result["ratios"]

    assert result["command"] == "python scripts/bench.py " + " ".join(argv)
    assert result["versions"]["torch"] and result["hardware"]["cpu_count"] >= 1
    assert _positive(result["model"]["parameters"]) and result["model"]["name"] == "tiny"
    assert result["workload"]["forced_length"] == {"median": 8, "sigma": 1.0, "max": 16}
    for name in ("tether_sync", "tether_async"):
        run = systems[name]
        assert run["steps"] == STEPS and run["accounting"]["consumed"] == STEPS * BATCH
        for key in ("consumed_tokens", "train_time_s", "effective_tokens_per_s", "weight_sync_bytes",
                    "rollout_tokens_per_s_median", "trainer_memory_peak_gib"):
            assert _positive(run[key]), (name, key, run[key])
        assert {"time/step_s", "time/rollout_wait_s", "time/train_s", "time/weight_sync_s",
                "time/publish_idle_s"} <= set(run["time_median_s"])
        # each publish's transfer lies inside its idle window (admission paused), so the medians are ordered too
        assert run["time_median_s"]["time/publish_idle_s"] >= run["time_median_s"]["time/weight_sync_s"]
        assert all(_positive(v) for v in run["time_median_s"].values()), run["time_median_s"]
        # docs/design.md section 7: tokens of the trajectories trained on / wall time of training
        assert run["effective_tokens_per_s"] == pytest.approx(run["consumed_tokens"] / run["train_time_s"], rel=1e-6)
        assert 1 <= run["response_len_mean"] <= 16  # forced lengths, clipped to [1, max]
    assert systems["tether_sync"]["staleness_lag_max"] == 0 and systems["tether_async"]["staleness_lag_max"] <= 4

    gen, train, bare, trl = (systems[k] for k in ("standalone_generation", "standalone_trainer", "bare_transfer", "trl"))
    for d, keys in ((gen, ("tokens", "response_tokens", "seconds", "tokens_per_s")),
                    (train, ("batch_tokens", "step_s_median", "tokens_per_s", "memory_peak_gib")),
                    (bare, ("bytes", "seconds_median", "gib_per_s"))):
        assert all(_positive(d[k]) for k in keys), d
    # the asynchronous run's concurrency: min(max_concurrent_groups = 2, (eta + 1) * B / G = 10 groups admitted),
    # over at least four waves (8 groups), or a run's worth of groups (STEPS * BATCH / GROUP = 6) if more
    assert gen["concurrent_groups_per_worker"] == 2 and gen["groups"] == 8
    assert gen["trajectories"] == 8 * GROUP and gen["tokens_per_s"] == pytest.approx(gen["tokens"] / gen["seconds"])
    assert bare["bytes"] == systems["tether_async"]["weight_sync_bytes"] and bare["route"].startswith("gloo broadcast")
    # forced lengths: the synchronous run consumes six of the standalone engine's eight groups
    assert systems["tether_sync"]["consumed_tokens"] < gen["tokens"]

    sync_tps = systems["tether_sync"]["effective_tokens_per_s"]
    async_tps = systems["tether_async"]["effective_tokens_per_s"]
    assert ratios["async_over_sync"] == pytest.approx(async_tps / sync_tps)
    assert ratios["pipeline_efficiency"] == pytest.approx(async_tps / min(gen["tokens_per_s"], train["tokens_per_s"]))
    bound = gen["tokens_per_s"] * train["tokens_per_s"] / (gen["tokens_per_s"] + train["tokens_per_s"])
    assert ratios["time_shared_bound_tokens_per_s"] == pytest.approx(bound)
    assert ratios["time_shared_efficiency"] == pytest.approx(async_tps / bound)
    sync_s = systems["tether_async"]["time_median_s"]["time/weight_sync_s"]
    assert ratios["weight_sync_bandwidth_fraction"] == pytest.approx(bare["seconds_median"] / sync_s)
    assert ratios["publish_idle_s"] == systems["tether_async"]["time_median_s"]["time/publish_idle_s"]
    mem = result["memory_peak_gib"]
    assert all(_positive(mem[k]) for k in ("tether_sync_trainer", "tether_async_trainer", "standalone_trainer"))

    if importlib.util.find_spec("trl") is None:
        assert trl == "not installed" and ratios["tether_over_trl"] is None
        return
    assert trl["steps"] == STEPS and trl["generation"] == "transformers generate"
    assert all(_positive(trl[k]) for k in ("consumed_tokens", "train_time_s", "effective_tokens_per_s",
                                           "process_memory_peak_gib"))
    # TRL generated and trained on exactly the tokens tether did: same prompts, same forced lengths
    assert trl["consumed_tokens"] == systems["tether_sync"]["consumed_tokens"]
    assert trl["forced_response_tokens"] == pytest.approx(systems["tether_sync"]["response_len_mean"] * STEPS * BATCH)
    assert result["effective_tokens_per_s"] == {"tether_sync": sync_tps, "tether_async": async_tps,
                                                "trl": trl["effective_tokens_per_s"]}
    assert ratios["tether_over_trl"] == pytest.approx(async_tps / trl["effective_tokens_per_s"])
    assert _positive(mem["trl_process"])
