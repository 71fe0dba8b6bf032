"""Micro-benchmarks beside the training pipeline: the physical limit of a weight transfer and the
standalone generation throughput of one engine. Each prints its numbers and writes JSON.

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    import torch

    params, nbytes = _model_bytes(args.model_dir, args.dtype)
    device = torch.device(args.device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:])  # the first copy pays for warm-up
    return {"kind": "transfer", "route": f"{device.type} copy", "parameters": params, "bytes": nbytes,
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


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["transfer", "generate"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--kv-cache-gib", type=float, default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = transfer(args) if args.what == "transfer" else asyncio.run(_generate(args))
    import torch

    result.update({"model_dir": os.path.basename(os.path.normpath(args.model_dir)), "dtype": args.dtype,
                   "torch": torch.__version__, "host": platform.node(),
                   "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()})
    log.info(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
