"""Benchmarks. `pipeline` runs, in one command, tether synchronous (eta = 0) and asynchronous (eta = 4)
on one forced-length workload (rollout.forced_length_*), the rollout workers and the trainer alone on
the same workload, a bare transfer of the weight-sync bytes by the same route, and TRL's GRPOTrainer
on the same model, prompts, lengths, group and batch sizes; it prints a table and writes one JSON.
`transfer` and `generate` are micro-benchmarks of one copy and one engine. Hydra overrides go last.

    python scripts/bench.py pipeline --out bench.json model=tiny rollout.engine=hf rollout.forced_length_median=8 rollout.forced_length_max=16 rollout.max_new_tokens=16 trainer.max_steps=3 trainer.batch_size=8 trainer.group_size=4 trainer.micro_batch_size=4 rollout.num_cpus=0.5 trainer.num_cpus=0.5 rewards.num_workers=1 rollout.max_concurrent_groups=2 task.num_eval=2
    python scripts/bench.py publish --repeats 10 --out publish.json model=tiny rollout.engine=hf    # publishes alone vs a bare transfer
    python scripts/bench.py transfer --model-dir DIR --out transfer.json           # device-to-device copy of the model's bytes
    python scripts/bench.py generate --model-dir DIR --prompts 256 --max-tokens 256 --out gen.json
    python scripts/bench.py generate --model-dir DIR --device cpu --prompts 16 --max-tokens 32 --kv-cache-gib 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# the repo's packages, and the bench-only modules beside this file (benchlib, bench_trl): scripts/ is no package
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

log = logging.getLogger("bench")


def _model_bytes(model_dir: str, dtype: str) -> tuple[int, int]:
    """(parameters, bytes in `dtype`) of a safetensors model directory, from the headers only."""
    import torch
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(key).get_shape()) for key in st.keys())
    return n, n * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def transfer(args) -> dict:
    """The colocated physical limit: one device-to-device copy of the weights' bytes (median of runs)."""
    from benchlib import TransferProbe

    params, nbytes = _model_bytes(args.model_dir, args.dtype)
    probe = TransferProbe(args.device)
    med = statistics.median(probe.copy(nbytes, args.repeats))  # after one warm-up copy
    return {"kind": "transfer", "route": f"{probe.device.type} copy", "parameters": params, "bytes": nbytes,
            "seconds_median": med, "gib_per_s": nbytes / med / 2**30}


async def _generate(args) -> dict:
    from rollout.engine import SamplingSpec
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(model_path=args.model_dir, dtype=args.dtype, max_model_len=args.max_tokens + 64,
                        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib,
                        enforce_eager=args.enforce_eager)
    await engine.start()
    try:
        spec = SamplingSpec(max_tokens=args.max_tokens, min_tokens=args.max_tokens, ignore_eos=True, temperature=1.0)
        prompts = [[1 + (i * 7 + j) % 1000 for j in range(32)] for i in range(args.prompts)]
        await asyncio.gather(*(engine.generate(f"warm{i}", p, spec) for i, p in enumerate(prompts[:4])))
        t0 = time.perf_counter()
        segs = await asyncio.gather(*(engine.generate(f"r{i}", p, spec) for i, p in enumerate(prompts)))
        dt = time.perf_counter() - t0
    finally:
        await engine.close()
    tokens = sum(len(s.token_ids) for s in segs)
    return {"kind": "generate", "prompts": args.prompts, "max_tokens": args.max_tokens, "tokens": tokens,
            "seconds": dt, "tokens_per_s": tokens / dt}


# ---- pipeline: tether synchronous vs asynchronous, their standalone limits, weight sync, TRL ------

REPO = Path(__file__).resolve().parent.parent
# Added before the user's overrides (which win). text_hash: every group gets distinct rewards, so every
# trajectory is trained on; a sparse task reward on forced-length responses would leave most groups all-0
# and the trainer (which skips zero-advantage trajectories) nearly idle. No checkpoints or export: they
# are not part of what is compared (TRL writes none either).
PIPELINE_DEFAULTS = ["logger.wandb.mode=disabled", "logger.progress=false", "logger.sample_every=0",
                     "task.reward=text_hash", "checkpoint.enabled=false", "checkpoint.export_hf=false"]
TIME_KEYS = ("time/step_s", "time/rollout_wait_s", "time/train_s", "time/weight_sync_s",
             "time/publish_idle_s", "time/train_batch_s", "time/train_prox_s", "time/train_update_s")
# dense bf16 peak of the GPU (no sparsity), for model FLOP utilisation; overridden by --peak-tflops
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
PARTS = ("sync", "async", "generation", "trainer", "transfer", "trl")


def _compose(overrides: list[str]):
    """The config scripts/train.py would see with these overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from configs.schema import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _num_groups(cfg) -> int:
    """Prompt groups a run consumes: steps x B / G."""
    return cfg.trainer.max_steps * cfg.trainer.batch_size // cfg.trainer.group_size


def _prompt_order(cfg, num_prompts: int, n: int) -> list[int]:
    """The first n prompt indices of a run's data cursor: group `seq` of the run gets prompt order[seq]."""
    from staleness.service import prompt_order

    return prompt_order(num_prompts, cfg.seed, n)


def _tether(cfg) -> dict:
    """One training run (trainer.loop.run); effective throughput as docs/design.md section 7 defines it:
    tokens of the trajectories trained on / wall time of training."""
    from trainer.loop import run

    summary = run(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    acc = summary["accounting"]
    return {
        "max_staleness": cfg.staleness.max_staleness, "steps": len(rows),
        "consumed_tokens": sum(r["train/tokens"] for r in rows), "train_time_s": summary["train_time_s"],
        "effective_tokens_per_s": summary["perf/consumed_tokens_per_s"],
        "time_median_s": {k: statistics.median(r[k] for r in rows) for k in TIME_KEYS if k in rows[0]},
        "train_tokens_per_s_median": statistics.median(r["train/tokens"] / r["time/train_s"] for r in rows),
        "rollout_tokens_per_s_median": statistics.median(r["rollout/tokens_per_s"] for r in rows),
        "response_len_mean": statistics.mean(r["rollout/response_len_mean"] for r in rows),
        "staleness_lag_max": summary["staleness/lag_max_seen"],
        "weight_sync_bytes": rows[0]["weight_sync/bytes"],
        "trainer_memory_peak_gib": max(r["memory/max_allocated_gib"] for r in rows),
        "accounting": {k: acc[k] for k in ("admitted", "consumed", "dropped_total", "in_flight")},
    }


def _pipeline_concurrency(cfg) -> int:
    """Groups one rollout worker generates at once in the asynchronous run: its loops
    (rollout.max_concurrent_groups), unless the admission rule allows fewer in flight ((eta + 1) * B)."""
    r, t = cfg.rollout, cfg.trainer
    admitted = (cfg.staleness.max_staleness + 1) * t.batch_size // t.group_size
    return max(1, min(r.max_concurrent_groups, math.ceil(admitted / r.num_workers)))


def _standalone_generation(cfg, model_dir: str, layout: dict, num_prompts: int) -> dict:
    """The rollout workers alone (no trainer, no publish), with the run's engines, resources and the
    concurrency the asynchronous run generates with: the most they can feed the trainer. At least four
    waves of groups, so the long tail of the last wave does not dominate the rate."""
    import ray

    from benchlib import BenchRolloutWorker

    r = cfg.rollout
    concurrency = _pipeline_concurrency(cfg)
    groups = max(_num_groups(cfg), 4 * concurrency * r.num_workers)
    order = _prompt_order(cfg, num_prompts, groups)
    tickets = [{"seq": seq, "prompt_index": p, "version": 0} for seq, p in enumerate(order)]
    workers = [ray.remote(BenchRolloutWorker).options(num_cpus=r.num_cpus, num_gpus=layout["rollout_gpus"],
                                                      max_concurrency=10_000).remote(i, cfg, model_dir, None)
               for i in range(r.num_workers)]
    try:
        ray.get([w.start.remote() for w in workers])  # engines up, not timed
        t0 = time.perf_counter()
        parts = ray.get([w.generate_standalone.remote(tickets[i :: len(workers)], concurrency)
                         for i, w in enumerate(workers)])
        seconds = time.perf_counter() - t0
        ray.get([w.close.remote() for w in workers])
    finally:
        for w in workers:
            ray.kill(w)
    tokens, response = sum(p["tokens"] for p in parts), sum(p["response_tokens"] for p in parts)
    return {"groups": len(tickets), "concurrent_groups_per_worker": concurrency,
            "trajectories": sum(p["trajectories"] for p in parts), "tokens": tokens,
            "response_tokens": response, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "response_tokens_per_s": response / seconds}


def _synthetic_batch(cfg, model_dir: str) -> list:
    """One batch of the workload: the run's first B/G prompts, each with G responses of random tokens
    of the forced lengths. Rewards 2**k never equal their group's mean (for G >= 2), so every advantage
    is non-zero and every trajectory is trained on."""
    import torch
    from transformers import AutoTokenizer

    from rewards.tasks import build_task, render_prompt
    from rollout.forced_length import forced_length_of
    from rollout.trajectory import Trajectory

    task, tokenizer = build_task(cfg.task), AutoTokenizer.from_pretrained(model_dir)
    g = cfg.trainer.group_size
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = []
    for seq, index in enumerate(_prompt_order(cfg, len(task.train), cfg.trainer.batch_size // g)):
        prompt = render_prompt(task, tokenizer, task.train[index].question)
        for k in range(g):
            n = forced_length_of(cfg, seq, k)
            response = torch.randint(len(tokenizer), (n,), generator=gen).tolist()  # (n,)
            batch.append(Trajectory(f"{seq}-{k}", index, str(seq), prompt, response, [-1.0] * n, [0] * n, 0,
                                    reward=float(2**k), finish_reason="length"))
    return batch


def _standalone_trainer(cfg, model_dir: str, layout: dict, steps: int) -> dict:
    """TrainerWorker.train_step alone, on one fixed batch of the workload, with the run's resources:
    the most tokens the trainer can consume per second. One warm-up step first, not timed."""
    import ray

    from trainer.worker import TrainerWorker

    from trainer.fleet import start_trainer_group

    batch = _synthetic_batch(cfg, model_dir)
    trainer = ray.remote(TrainerWorker).options(num_cpus=cfg.trainer.num_cpus,
                                                num_gpus=layout["trainer_gpus"]).remote(cfg, model_dir)
    times = []
    try:
        start_trainer_group([trainer], layout["trainer_gpus"] > 0, cfg.weight_sync.timeout_s)
        ray.get(trainer.train_step.remote(batch))
        for _ in range(steps):
            t0 = time.perf_counter()
            metrics = ray.get(trainer.train_step.remote(batch))
            times.append(time.perf_counter() - t0)
    finally:
        ray.kill(trainer)
    if metrics["train/active_frac"] != 1.0:
        raise RuntimeError(f"standalone trainer: only {metrics['train/active_frac']:.0%} of the synthetic batch "
                           "was trained on; its throughput would not be comparable")
    tokens = sum(t.num_tokens for t in batch)
    return {"steps": steps, "batch_tokens": tokens, "step_s_median": statistics.median(times),
            "tokens_per_s": tokens * steps / sum(times), "memory_peak_gib": metrics["memory/max_allocated_gib"],
            "time_s": {k: metrics[k] for k in ("time/train_batch_s", "time/train_prox_s", "time/train_update_s")},
            "micro_batches": metrics["train/micro_batches"], "padding_frac": metrics["train/padding_frac"]}


def _bare_transfer(cfg, layout: dict, nbytes: int, repeats: int) -> dict:
    """The weight sync's bytes moved by the same route with nothing else: a broadcast from a process
    with the trainer's resources to one per engine rank (gloo / NCCL), or one device-to-device copy
    (colocated, CUDA IPC)."""
    import ray

    from benchlib import TransferProbe
    from weight_sync.messages import GroupAddress

    probe = ray.remote(TransferProbe)
    backend, r = layout["backend"], cfg.rollout
    probes = [probe.options(num_cpus=cfg.trainer.num_cpus, num_gpus=layout["trainer_gpus"]).remote()]
    try:
        if backend == "ipc":
            times = ray.get(probes[0].copy.remote(nbytes, repeats))
            route = "device-to-device copy (colocated)"
        else:
            ranks = r.num_workers * r.tensor_parallel_size
            probes += [probe.options(num_cpus=r.num_cpus / r.tensor_parallel_size,
                                     num_gpus=layout["rollout_gpus"] / r.tensor_parallel_size).remote()
                       for _ in range(ranks)]
            host, port = ray.get(probes[0].address.remote())
            address = GroupAddress(host, port, len(probes), backend, cfg.weight_sync.timeout_s)
            ray.get([p.join.remote(address, rank) for rank, p in enumerate(probes)])
            bucket = cfg.weight_sync.bucket_mb << 20
            per_rank = ray.get([p.broadcast.remote(nbytes, bucket, repeats) for p in probes])
            times = [max(ts) for ts in zip(*per_rank)]  # a repeat is over when every rank holds the bytes
            route = f"{backend} broadcast, 1 process to {ranks}, buckets of {cfg.weight_sync.bucket_mb} MB"
    finally:
        for p in probes:
            ray.kill(p)
    med = statistics.median(times)
    return {"route": route, "bytes": nbytes, "repeats": repeats, "seconds_median": med, "gib_per_s": nbytes / med / 2**30}


def _environment(cfg, model_dir: str) -> dict:
    import ray
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "ray": ray.__version__}
    try:
        import vllm

        versions["vllm"] = vllm.__version__
    except ImportError:
        versions["vllm"] = "not installed"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    hardware = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, "gpus": gpus}
    params, _ = _model_bytes(model_dir, "float32")
    return {"hardware": hardware, "versions": versions,
            "model": {"name": cfg.model.name, "dtype": cfg.model.dtype, "parameters": params}}


def _workload(cfg, layout: dict) -> dict:
    from rollout.forced_length import forced_length_of

    r, t = cfg.rollout, cfg.trainer
    lengths = [forced_length_of(cfg, seq, k) for seq in range(_num_groups(cfg)) for k in range(t.group_size)]
    return {"task": cfg.task.name, "reward": cfg.task.reward, "seed": cfg.seed,
            "forced_length": {"median": r.forced_length_median, "sigma": r.forced_length_sigma,
                              "max": r.forced_length_max or r.max_new_tokens},
            "response_len_drawn": {"mean": statistics.mean(lengths), "median": statistics.median(lengths), "max": max(lengths)},
            "group_size": t.group_size, "batch_size": t.batch_size, "steps": t.max_steps, "groups": _num_groups(cfg),
            "micro_batch_size": t.micro_batch_size, "temperature": r.temperature, "engine": r.engine,
            "rollout_workers": r.num_workers, "max_concurrent_groups": r.max_concurrent_groups, "layout": layout}


def _ratios(systems: dict) -> dict:
    """The ratios whose parts were measured (None where one is missing)."""
    def get(name):
        return systems.get(name) if isinstance(systems.get(name), dict) else None

    sync, async_, gen, train, bare, trl = map(get, ("tether_sync", "tether_async", "standalone_generation",
                                                    "standalone_trainer", "bare_transfer", "trl"))
    out = {"async_over_sync": None, "pipeline_efficiency": None, "time_shared_bound_tokens_per_s": None,
           "time_shared_efficiency": None, "weight_sync_bandwidth_fraction": None,
           "publish_idle_s": None, "tether_over_trl": None, "train_s_async_over_standalone": None}
    if async_ and sync:
        out["async_over_sync"] = async_["effective_tokens_per_s"] / sync["effective_tokens_per_s"]
    if async_ and gen and train:
        # the pipeline is at best as fast as its slower stage running alone
        out["pipeline_efficiency"] = async_["effective_tokens_per_s"] / min(gen["tokens_per_s"], train["tokens_per_s"])
    if gen and train:
        # trainer and engine sharing one device (a colocated GPU, the same CPU cores), each at its standalone
        # speed while it runs: a token costs 1/train + 1/generate seconds
        out["time_shared_bound_tokens_per_s"] = 1 / (1 / gen["tokens_per_s"] + 1 / train["tokens_per_s"])
        if async_:
            out["time_shared_efficiency"] = async_["effective_tokens_per_s"] / out["time_shared_bound_tokens_per_s"]
    if async_ and bare:
        # bytes/s of a publish as a fraction of the bare route's bytes/s (same bytes: a ratio of times)
        out["weight_sync_bandwidth_fraction"] = bare["seconds_median"] / async_["time_median_s"]["time/weight_sync_s"]
    if async_:
        # seconds the engines waited for new weights per publish (admission paused), median: what a user feels
        out["publish_idle_s"] = async_["time_median_s"]["time/publish_idle_s"]
    if async_ and trl:
        out["tether_over_trl"] = async_["effective_tokens_per_s"] / trl["effective_tokens_per_s"]
    if async_ and train:
        # training speed inside the pipeline against alone, per token (the batches differ in size)
        out["train_s_async_over_standalone"] = train["tokens_per_s"] / async_["train_tokens_per_s_median"]
    return out


def _mfu(systems: dict, params: int, peak_tflops: float | None) -> dict | None:
    """Model FLOP utilisation of the trainer: 6 * N * trained tokens/s / peak (forward + backward of a dense
    model, attention and the pi_prox pass not counted), standalone and inside the asynchronous run."""
    if not peak_tflops:
        return None
    rates = {"standalone_trainer": (systems.get("standalone_trainer") or {}).get("tokens_per_s"),
             "tether_async_train": (systems.get("tether_async") or {}).get("train_tokens_per_s_median")}
    return {"formula": "6 * N * tokens_per_s / (peak_tflops * 1e12)", "N": params, "peak_tflops": peak_tflops,
            **{k: 6 * params * v / (peak_tflops * 1e12) for k, v in rates.items() if isinstance(v, (int, float))}}


def pipeline(args) -> dict:
    """Synchronous (eta = 0) and asynchronous (eta = --max-staleness) runs of one forced-length workload,
    the standalone engine and trainer throughputs, a bare transfer of the weight-sync bytes, TRL."""
    from configs.schema import ConfigError
    from rewards.tasks import build_task
    from rollout.models import resolve_model_dir
    from trainer import cluster

    workdir = Path(args.workdir)
    base = [*PIPELINE_DEFAULTS, *args.overrides]
    cfgs = {name: _compose([*base, f"staleness.max_staleness={eta}", f"output_dir={(workdir / name).resolve()}"])
            for name, eta in (("tether_sync", 0), ("tether_async", args.max_staleness))}
    cfg = cfgs["tether_async"]
    if cfg.rollout.forced_length_median is None:
        raise ConfigError("rollout.forced_length_median=None: the benchmark needs forced lengths; pass e.g. "
                          "rollout.forced_length_median=256 rollout.forced_length_max=2048 rollout.max_new_tokens=2048")
    if cfg.trainer.group_size < 2:
        raise ConfigError(f"trainer.group_size={cfg.trainer.group_size} must be >= 2 for the benchmark (GRPO in TRL needs 2)")
    systems: dict = {}

    def done(name: str, result) -> None:  # each result is kept as it comes: a killed run still leaves them
        systems[name] = result
        if args.out:
            Path(args.out + ".partial").write_text(json.dumps(systems, indent=1))

    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        raise ConfigError(f"--parts={args.parts}: each part must be one of {', '.join(PARTS)}")
    for name, part in (("tether_sync", "sync"), ("tether_async", "async")):
        if part in parts:
            done(name, _tether(cfgs[name]))  # each run validates its config first
    import ray

    # connected and resolved already when a tether run came first; prepare() is idempotent
    layout, _ = cluster.prepare(cfg)
    model_dir = str(resolve_model_dir(cfg.model.name, cfg.model.path, cfg.cache_dir))
    num_prompts = len(build_task(cfg.task).train)
    if "generation" in parts:
        done("standalone_generation", _standalone_generation(cfg, model_dir, layout, num_prompts))
    if "trainer" in parts:
        done("standalone_trainer", _standalone_trainer(cfg, model_dir, layout, args.trainer_steps))
    if "transfer" in parts:
        nbytes = (systems.get("tether_async") or systems.get("tether_sync") or {}).get("weight_sync_bytes") \
            or _model_bytes(model_dir, cfg.model.dtype)[1]
        done("bare_transfer", _bare_transfer(cfg, layout, nbytes, args.repeats))
    if "trl" in parts:
        ray.shutdown()  # TRL runs in this process: give its GPU memory back first
        if args.trl_generation == "off":
            done("trl", "off")
        else:
            from bench_trl import trl_side_by_side

            order = _prompt_order(cfg, num_prompts, _num_groups(cfg))
            done("trl", trl_side_by_side(cfg, model_dir, workdir, args.trl_generation, order))
    env = _environment(cfg, model_dir)
    gpus = env["hardware"]["gpus"]
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if gpus and k in gpus[0]), None)
    effective = {k: systems[k]["effective_tokens_per_s"] for k in ("tether_sync", "tether_async", "trl")
                 if isinstance(systems.get(k), dict)}
    memory = {k: systems[s][f] for k, s, f in (("tether_sync_trainer", "tether_sync", "trainer_memory_peak_gib"),
                                                 ("tether_async_trainer", "tether_async", "trainer_memory_peak_gib"),
                                                 ("standalone_trainer", "standalone_trainer", "memory_peak_gib"),
                                                 ("trl_process", "trl", "process_memory_peak_gib"))
              if isinstance(systems.get(s), dict)}
    return {"kind": "pipeline", "command": " ".join(["python", "scripts/bench.py", *args.argv]),
            **env, "workload": _workload(cfg, layout), "systems": systems,
            "effective_tokens_per_s": effective, "ratios": _ratios(systems),
            "model_flop_utilisation": _mfu(systems, env["model"]["parameters"], peak),
            "targets": {"async_over_sync": 2.5, "pipeline_efficiency": 0.85}, "memory_peak_gib": memory}


def publish_bench(args) -> dict:
    """The publish alone: the run's trainer and engines set up as scripts/train.py would, then --repeats
    publishes (after one untimed) with the engines idle and the same weights; medians of the weight
    transfer (`time/weight_sync_s`) and of the whole publish with admission paused (`time/publish_idle_s`),
    against a bare transfer of the same bytes by the same route."""
    from trainer.loop import build_run

    cfg = _compose([*PIPELINE_DEFAULTS, f"output_dir={(Path(args.workdir) / 'publish').resolve()}", *args.overrides])
    run_, _ = build_run(cfg)  # what scripts/train.py builds
    layout, model_dir = run_.fleet.layout, run_.model_dir
    try:
        run_.setup()
        pubs = [run_.publish(version) for version in range(1, args.repeats + 2)][1:]  # the first one warms up
    finally:
        run_.monitor.close()
        run_.close()
    sync, idle = statistics.median(p["seconds"] for p in pubs), statistics.median(p["idle_s"] for p in pubs)
    bare = _bare_transfer(cfg, layout, pubs[0]["bytes"], args.repeats)
    return {"kind": "publish", "command": " ".join(["python", "scripts/bench.py", *args.argv]),
            **_environment(cfg, model_dir), "layout": layout, "bytes": pubs[0]["bytes"], "publishes": len(pubs),
            "weight_sync_s": [p["seconds"] for p in pubs], "publish_idle_s": [p["idle_s"] for p in pubs],
            "weight_sync_s_median": sync, "publish_idle_s_median": idle, "bare_transfer": bare,
            "weight_sync_bandwidth_fraction": bare["seconds_median"] / sync}


def _table(result: dict) -> str:
    s, ratio = result["systems"], result["ratios"]
    rows = [("tether_sync", "effective_tokens_per_s", "effective (consumed / training wall time)"),
            ("tether_async", "effective_tokens_per_s", "effective (consumed / training wall time)"),
            ("trl", "effective_tokens_per_s", "effective, TRL GRPOTrainer"),
            ("standalone_generation", "tokens_per_s", "rollout workers alone"),
            ("standalone_trainer", "tokens_per_s", "train_step alone")]
    lines = [f"{'system':<24}{'tokens/s':>12}  note"]
    for name, key, note in rows:
        value = s.get(name)
        lines.append(f"{name:<24}{value[key]:>12.1f}  {note}" if isinstance(value, dict)
                     else f"{name:<24}{'-':>12}  {value or 'not measured'}")
    if isinstance(s.get("tether_async"), dict) and isinstance(s.get("bare_transfer"), dict):
        lines.append(f"weight sync {s['tether_async']['time_median_s']['time/weight_sync_s']:.4g} s vs bare "
                     f"{s['bare_transfer']['seconds_median']:.4g} s ({s['bare_transfer']['route']}); engines idle "
                     f"{s['tether_async']['time_median_s']['time/publish_idle_s']:.4g} s per publish")
    mfu = result.get("model_flop_utilisation")
    if mfu:
        lines.append(f"MFU = {mfu['formula']}, N = {mfu['N']:,}, peak {mfu['peak_tflops']:g} TFLOP/s: " +
                     ", ".join(f"{k} {v:.1%}" for k, v in mfu.items() if k.startswith(("standalone", "tether"))))
    lines += [f"{k:<32}{v:.3f}" if v is not None else f"{k:<32}-" for k, v in ratio.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("transfer", "generate"):
        p = sub.add_parser(name)
        p.add_argument("--model-dir", required=True)
        p.add_argument("--dtype", default="bfloat16")
        p.add_argument("--device", default="cuda")
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--prompts", type=int, default=256)
        p.add_argument("--max-tokens", type=int, default=256)
        p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
        p.add_argument("--kv-cache-gib", type=float, default=None)
        p.add_argument("--enforce-eager", action="store_true")
        p.add_argument("--out", default=None)
    p = sub.add_parser("pipeline", help="sync vs async runs, standalone limits, weight sync, TRL; Hydra overrides after the options")
    p.add_argument("--max-staleness", type=int, default=4, help="eta of the asynchronous run (the synchronous one has 0)")
    p.add_argument("--trainer-steps", type=int, default=3, help="timed steps of the standalone trainer")
    p.add_argument("--repeats", type=int, default=5, help="bare transfers timed")
    p.add_argument("--trl-generation", choices=["auto", "transformers", "vllm", "off"], default="auto",
                   help="auto: TRL's colocated vLLM on GPU, transformers generate on CPU")
    p.add_argument("--workdir", default="outputs/bench", help="run outputs (metrics.jsonl, accounting.json) go here")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated subset of " + ",".join(PARTS) + " (e.g. async,trl on separate GPUs side by side)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for model FLOP utilisation; default by GPU name (H100/H200 989)")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for scripts/train.py")
    p = sub.add_parser("publish", help="publishes alone (engines idle), against a bare transfer; Hydra overrides last")
    p.add_argument("--repeats", type=int, default=10, help="timed publishes (and bare transfers)")
    p.add_argument("--workdir", default="outputs/bench")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for scripts/train.py")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.what == "pipeline":
        result = pipeline(args)
        log.info("%s", _table(result))
    elif args.what == "publish":
        result = publish_bench(args)
        log.info("publish of %d bytes: weight sync %.4g s, idle %.4g s, bare %.4g s (%s): fraction %.3f",
                 result["bytes"], result["weight_sync_s_median"], result["publish_idle_s_median"],
                 result["bare_transfer"]["seconds_median"], result["bare_transfer"]["route"],
                 result["weight_sync_bandwidth_fraction"])
    else:
        result = transfer(args) if args.what == "transfer" else asyncio.run(_generate(args))
        import torch

        result.update({"model_dir": os.path.basename(os.path.normpath(args.model_dir)), "dtype": args.dtype,
                       "torch": torch.__version__, "host": platform.node(),
                       "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()})
        log.info(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        Path(args.out + ".partial").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
