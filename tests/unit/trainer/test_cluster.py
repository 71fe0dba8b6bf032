"""trainer/cluster.py: the automatic settings for a cluster of 0, 1 and 2 GPUs (user overrides win),
the rules between them, the GPU each actor gets (checked on a real Ray instance with simulated
GPUs), and the resource check of an existing cluster."""

import json
import subprocess
import sys

import pytest

from configs.schema import ConfigError, validate, validate_resolved
from tests.conftest import REPO, compose
from trainer.cluster import Placement, layout, resolve


def _resolved(gpus, *overrides):
    cfg = compose(["output_dir=/tmp/unused", *overrides])
    validate(cfg)  # the unresolved config is valid as it is
    chosen = resolve(cfg, gpus)
    validate_resolved(cfg)
    return cfg, chosen


def _settings(cfg) -> dict:
    r, t = cfg.rollout, cfg.trainer
    return {"model.dtype": cfg.model.dtype, "rollout.enforce_eager": r.enforce_eager, "rollout.kv_cache_gib": r.kv_cache_gib,
            "rollout.num_gpus": r.num_gpus, "trainer.num_gpus": t.num_gpus, "rollout.colocate": r.colocate,
            "weight_sync.backend": cfg.weight_sync.backend, "trainer.max_tokens_per_micro_batch": t.max_tokens_per_micro_batch,
            "rollout.max_concurrent_groups": r.max_concurrent_groups}


def test_no_gpu_gives_the_cpu_values():
    cfg, chosen = _resolved(0)
    # the defaults before they became automatic
    expected = {"model.dtype": "float32", "rollout.enforce_eager": True, "rollout.kv_cache_gib": 0.5,
                "rollout.num_gpus": 0.0, "trainer.num_gpus": 0.0, "rollout.colocate": False, "weight_sync.backend": "gloo",
                "trainer.max_tokens_per_micro_batch": 2048, "rollout.max_concurrent_groups": 4}
    assert _settings(cfg) == expected
    assert chosen == expected  # every one was automatic, and the log line names each
    assert layout(cfg) == {"colocate": False, "rollout_gpus": 0.0, "trainer_gpus": 0.0, "backend": "gloo"}


def test_one_gpu_colocates_a_bf16_engine_with_cuda_graphs():
    cfg, chosen = _resolved(1)
    assert _settings(cfg) == {"model.dtype": "bfloat16", "rollout.enforce_eager": False, "rollout.kv_cache_gib": None,
                              "rollout.num_gpus": 1.0, "trainer.num_gpus": 1.0, "rollout.colocate": True,
                              "weight_sync.backend": "ipc", "trainer.max_tokens_per_micro_batch": 8192,
                              "rollout.max_concurrent_groups": 20}  # (eta + 1) * B / G = 5 * 32 / 8 groups
    assert chosen["rollout.kv_cache_gib"] is None  # logged: vLLM sizes it from gpu_memory_utilization
    # trainer half the GPU, the engines the other half
    assert layout(cfg) == {"colocate": True, "rollout_gpus": 0.5, "trainer_gpus": 0.5, "backend": "ipc"}
    placement = Placement(cfg, layout(cfg))
    assert placement.shared == [[("trainer", 0), ("rollout", 0)]] and placement.gpus_needed() == 1


def test_two_gpus_put_trainer_and_engine_on_separate_gpus():
    cfg, _ = _resolved(2)
    assert _settings(cfg) == {"model.dtype": "bfloat16", "rollout.enforce_eager": False, "rollout.kv_cache_gib": None,
                              "rollout.num_gpus": 1.0, "trainer.num_gpus": 1.0, "rollout.colocate": False,
                              "weight_sync.backend": "nccl", "trainer.max_tokens_per_micro_batch": 8192,
                              "rollout.max_concurrent_groups": 20}
    assert layout(cfg) == {"colocate": False, "rollout_gpus": 1.0, "trainer_gpus": 1.0, "backend": "nccl"}
    placement = Placement(cfg, layout(cfg))
    assert placement.shared == [] and placement.gpus_needed() == 2


def test_tensor_parallel_engine_gets_one_gpu_per_rank():
    cfg, _ = _resolved(4, "rollout.tensor_parallel_size=2")
    assert cfg.rollout.num_gpus == 2 and cfg.trainer.num_gpus == 1
    # three engines share the staleness window's 20 groups: 7 each; a small window still gets 4
    assert _resolved(4, "rollout.num_workers=3")[0].rollout.max_concurrent_groups == 7
    assert _resolved(1, "staleness.max_staleness=0")[0].rollout.max_concurrent_groups == 4
    assert Placement(cfg, layout(cfg)).gpus_needed() == 3


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_user_overrides_win(gpus):
    overrides = ["model.dtype=float16", "rollout.enforce_eager=true", "rollout.kv_cache_gib=2",
                 "rollout.num_gpus=0", "trainer.num_gpus=0", "rollout.colocate=false", "weight_sync.backend=gloo",
                 "trainer.max_tokens_per_micro_batch=4096", "rollout.max_concurrent_groups=6"]
    cfg, chosen = _resolved(gpus, *overrides)
    assert chosen == {}
    assert _settings(cfg) == {"model.dtype": "float16", "rollout.enforce_eager": True, "rollout.kv_cache_gib": 2.0,
                              "rollout.num_gpus": 0.0, "trainer.num_gpus": 0.0, "rollout.colocate": False,
                              "weight_sync.backend": "gloo", "trainer.max_tokens_per_micro_batch": 4096,
                              "rollout.max_concurrent_groups": 6}


def test_one_override_keeps_the_other_choices_automatic():
    # a CPU trainer beside a GPU engine: the engine still gets bf16 and CUDA graphs; no NCCL (one side on CPU)
    cfg, chosen = _resolved(2, "trainer.num_gpus=0")
    assert (cfg.rollout.num_gpus, cfg.model.dtype, cfg.rollout.enforce_eager) == (1.0, "bfloat16", False)
    assert cfg.weight_sync.backend == "gloo" and "trainer.num_gpus" not in chosen
    assert cfg.trainer.max_tokens_per_micro_batch == 2048  # the CPU trainer's budget
    # an engine forced onto the CPU of a GPU cluster gets the CPU engine's values
    cfg, _ = _resolved(2, "rollout.num_gpus=0")
    assert (cfg.model.dtype, cfg.rollout.enforce_eager, cfg.rollout.kv_cache_gib) == ("float32", True, 0.5)
    # resolving twice changes nothing
    before = _settings(cfg)
    assert resolve(cfg, 2) == {} and _settings(cfg) == before


def test_two_fsdp_ranks_on_two_gpus_with_the_engine_sharing_one():
    """trainer.num_workers=2 trainer.num_gpus=0.5 rollout.num_gpus=0.5 on 2 GPUs: rank k on GPU k, the
    engine beside rank 1, never beside rank 0 (NCCL cannot join two ranks of its group on one device)."""
    cfg, _ = _resolved(2, "trainer.num_workers=2", "trainer.num_gpus=0.5", "rollout.num_gpus=0.5")
    assert cfg.weight_sync.backend == "nccl" and not cfg.rollout.colocate
    placement = Placement(cfg, layout(cfg))
    assert placement.shared == [[("trainer", 0)], [("trainer", 1), ("rollout", 0)]]
    assert placement.gpus_needed() == 2
    placement.check_resources({"CPU": 3, "GPU": 2}, local=False)
    with pytest.raises(ConfigError, match=r"need 2 GPUs .* has 1;"):
        placement.check_resources({"CPU": 3, "GPU": 1}, local=False)  # the fractions sum to 1.5 but need 2 devices
    # a second engine cannot share rank 1's GPU with the first (one NCCL group): a third GPU
    cfg, _ = _resolved(3, "trainer.num_workers=2", "trainer.num_gpus=0.5", "rollout.num_gpus=0.5",
                       "rollout.num_workers=2")
    placement = Placement(cfg, layout(cfg))
    assert placement.shared == [[("trainer", 0)], [("trainer", 1), ("rollout", 0)], [("rollout", 1)]]
    assert "GPU 1: trainer rank 1, engine 0" in placement.describe()


def test_colocated_engines_share_trainer_rank_0s_gpu():
    cfg, _ = _resolved(1, "rollout.num_workers=2")
    placement = Placement(cfg, layout(cfg))
    assert placement.shared == [[("trainer", 0), ("rollout", 0), ("rollout", 1)]]


@pytest.mark.parametrize("gpus,overrides,key", [
    (0, ["rollout.colocate=true"], "rollout.colocate"),
    (2, ["weight_sync.backend=ipc"], "weight_sync.backend"),
    (0, ["weight_sync.backend=nccl"], "weight_sync.backend"),
    (1, ["weight_sync.backend=nccl"], "weight_sync.backend"),  # colocated: both on one device
    (2, ["rollout.num_gpus=0", "rollout.kv_cache_gib=null"], None),  # null stays automatic: 0.5 on CPU
])
def test_rules_between_resolved_values(gpus, overrides, key):
    cfg = compose(["output_dir=/tmp/unused", *overrides])
    resolve(cfg, gpus)
    if key is None:
        validate_resolved(cfg)
        return
    with pytest.raises(ConfigError) as e:
        validate_resolved(cfg)
    assert str(e.value).startswith(f"{key}=") and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,key", [
    (["trainer.num_gpus=2"], "trainer.num_gpus"),
    (["rollout.num_gpus=2"], "rollout.num_gpus"),  # tensor_parallel_size=1
    (["rollout.num_gpus=0.5", "rollout.tensor_parallel_size=2"], "rollout.num_gpus"),
])
def test_static_gpu_rules(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}="):
        validate(compose(["output_dir=/tmp/unused", *overrides]))


def test_an_existing_cluster_keeps_the_fail_fast_message():
    cfg, _ = _resolved(0, "rollout.num_workers=2")
    placement = Placement(cfg, layout(cfg))
    with pytest.raises(ConfigError) as e:
        placement.check_resources({"CPU": 2}, local=False)
    assert str(e.value).startswith("the actors need 3 CPUs") and "the Ray cluster has 2" in str(e.value)
    assert str(e.value).endswith("or add nodes")
    with pytest.raises(ConfigError, match="raise ray.num_cpus or unset it$"):
        placement.check_resources({"CPU": 2}, local=True)  # ray.num_cpus=2 asked for a local instance that small


# A real Ray instance that believes it has 2 GPUs (Ray's resources are logical): each probe actor is
# placed with the options trainer.loop gives the trainer ranks and rollout workers, and reports the
# GPU ids Ray assigned it (what CUDA_VISIBLE_DEVICES is set to on a GPU machine).
_PROBE = r"""
import json, sys
import ray
from tests.conftest import compose
from trainer.cluster import Placement, layout, resolve

@ray.remote
class Probe:
    def gpus(self):
        return [str(g) for g in ray.get_gpu_ids()]

ray.init(address="local", num_cpus=6, num_gpus=2, include_dashboard=False)
out = {}
for name, overrides in json.loads(sys.argv[1]).items():
    cfg = compose(["output_dir=/tmp/unused", *overrides])
    resolve(cfg, 2)
    placement = Placement(cfg, layout(cfg))
    placement.reserve(timeout_s=60)
    actors = {f"trainer{k}": Probe.options(**placement.trainer(k)).remote() for k in range(cfg.trainer.num_workers)}
    actors.update({f"engine{i}": Probe.options(**placement.worker(i)).remote() for i in range(cfg.rollout.num_workers)})
    out[name] = {k: ray.get(a.gpus.remote()) for k, a in actors.items()}
    for a in actors.values():
        ray.kill(a)
    placement.release()
print("RESULT" + json.dumps(out))
"""


def test_gpu_assignment_on_a_ray_instance_with_two_simulated_gpus():
    cases = {
        "fsdp2_shared": ["trainer.num_workers=2", "trainer.num_gpus=0.5", "rollout.num_gpus=0.5"],
        "disaggregated": [],
        "colocated": ["rollout.colocate=true", "rollout.num_workers=2"],
    }
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.split("RESULT", 1)[1])
    shared = got["fsdp2_shared"]
    assert all(len(ids) == 1 for ids in shared.values())
    assert shared["trainer0"] != shared["trainer1"]  # two FSDP2 ranks, two devices
    assert shared["engine0"] == shared["trainer1"] != shared["trainer0"]  # NCCL: engine off rank 0's device
    dis = got["disaggregated"]
    assert len(dis["trainer0"]) == len(dis["engine0"]) == 1 and dis["trainer0"] != dis["engine0"]
    col = got["colocated"]
    assert col["trainer0"] == col["engine0"] == col["engine1"]  # CUDA IPC: on rank 0's device


def test_run_against_an_existing_instance_fails_fast_before_any_actor(tmp_path, ray_local, tiny_model_dir, monkeypatch):
    """The session's Ray instance is an existing cluster (whoever started it): it is not resized, and a
    run that asks for more CPUs than it has stops at start with one line; nothing is written, no actor
    is started."""
    from trainer import cluster
    from trainer.loop import run

    monkeypatch.setattr(cluster, "_started_here", False)  # an earlier in-process run may have started it
    cpus = ray_local.cluster_resources()["CPU"]
    cfg = compose(["model=tiny", "rollout.engine=hf", f"rollout.num_cpus={cpus:g}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert str(e.value).startswith(f"the actors need {cpus + 1:g} CPUs") and str(e.value).endswith("or add nodes")
    assert ray_local.cluster_resources()["CPU"] == cpus
    assert not (tmp_path / "out").exists()
    assert not [a for a in ray_local.util.list_named_actors() if a.startswith("tether:")]


def test_cpu_trainer_threads_leave_the_engines_their_cores():
    from trainer.cpu_share import fixed_threads, threads_for

    sync = compose(["staleness.max_staleness=0"], cluster_gpus=0)
    asyn = compose(["staleness.max_staleness=4"], cluster_gpus=0)
    two = compose(["staleness.max_staleness=4", "rollout.num_workers=2", "rollout.num_cpus=1.5"], cluster_gpus=0)
    assert fixed_threads(sync, 2) == 2  # the engines idle while it trains
    assert fixed_threads(asyn, 2) == 1 and fixed_threads(asyn, 16) == 15  # one engine asks for one CPU
    assert fixed_threads(two, 2) == 1 and fixed_threads(two, 8) == 5  # never below one thread
    # following the node: whole cores left to the rest of it once it uses more than 0.3 of one
    assert threads_for(2, 0.05) == 2 and threads_for(2, 0.29) == 2
    assert threads_for(2, 0.5) == 1 and threads_for(2, 1.2) == 1 and threads_for(2, 7.0) == 1
    assert threads_for(16, 1.0) == 15 and threads_for(16, 2.5) == 13


def test_a_fractional_reward_model_scorer_shares_the_colocated_gpu(tmp_path):
    # one GPU: trainer, engine and a scorer of 0.2 GPU in one whole-GPU bundle; Ray's fractions sum to 1
    cfg, _ = _resolved(1, f"rewards.model.path={tmp_path}", "rewards.model.num_gpus=0.2")
    lay = layout(cfg)
    assert lay["trainer_gpus"] == pytest.approx(0.4) and lay["rollout_gpus"] == pytest.approx(0.4)
    placement = Placement(cfg, lay)
    assert placement.shared == [[("trainer", 0), ("rollout", 0), ("scorer", 0)]] and placement.gpus_needed() == 1
    # on CPU a scorer is an actor of its own, counted in the CPUs the run needs
    cfg, _ = _resolved(0, f"rewards.model.path={tmp_path}", "rewards.model.num_cpus=0.5")
    from trainer.cluster import cpus_needed

    assert cpus_needed(cfg) == cfg.rollout.num_cpus + cfg.trainer.num_cpus + 0.5
    assert Placement(cfg, layout(cfg)).scorer(0) == {"num_cpus": 0.5, "num_gpus": 0.0}
