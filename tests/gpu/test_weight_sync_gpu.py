"""GPU: a vLLM engine decoding with CUDA graphs (enforce_eager=False) serves the trainer's weights after
each of three publishes, by NCCL between two GPUs and by CUDA IPC on one shared GPU.

    TETHER_GPU_MODEL_DIR=$DIR python -m pytest -q tests/gpu/test_weight_sync_gpu.py   # 2 GPUs for the NCCL cases

The model is the bundled SmolLM2-135M (tests/gpu/conftest.py). The trainer (weight_sync/send.py over
an HF copy of it, float32 master weights, perturbed before each publish) and the
engine (rollout/vllm_engine.py) run in Ray actors. vLLM captures its CUDA graphs at start, over the
parameters' storage; a publish copies the new values into that same storage, so greedy decoding must
follow the new weights without a recapture. After each publish:
* the engine's fingerprint equals the trainer's weights cast to the engine dtype, bit for bit;
* the engine's greedy tokens are those of a transformers forward on the trainer's weights (in the
  engine dtype), teacher-forced on them: each is the argmax, or within `tol` of it where the two
  kernels' rounding can swap a near-tie (float32: 0.05, for attention kernels that multiply in
  TF32; bfloat16: 2.5, its rounding through 30 layers at logits of tens: vLLM's fused bf16 kernels
  and transformers' bf16 forward were seen 1.9 apart on an H200), and at least 12 of 16 are
  the exact argmax; tokens of stale weights would miss by far more at some position;
* the tokens differ from the previous version's (the publish changed what is served).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.vllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = [1, 42, 77, 300, 5, 1000, 7, 2024, 17]
NEW_TOKENS = 16
TOL = {"float32": 0.05, "bfloat16": 2.5}


def _actor_classes():
    """Built here so Ray pickles them by value (pytest imports this file as a top-level module)."""

    class Trainer:
        def __init__(self, model_dir: str, dtype: str) -> None:
            from transformers import AutoModelForCausalLM

            from weight_sync.send import Publisher

            self.dtype = getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
            named = dict(self.model.named_parameters())
            self.pub = Publisher(lambda: iter(named.items()), {n: p.shape for n, p in named.items()}, named, 0,
                                 torch.device("cuda"))

        def set_plan(self, plan) -> int:
            self.pub.set_plan(plan)
            return self.pub.plan.nbytes

        def address(self) -> tuple[str, int]:
            from weight_sync.transport import free_address

            return free_address()

        def join(self, address) -> None:
            self.pub.join(address)

        def ipc_handle(self) -> bytes:
            return self.pub.ipc_handle()

        def perturb(self, seed: int) -> None:
            gen = torch.Generator(device="cuda").manual_seed(seed)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen, device="cuda") * 0.05)

        def publish(self):
            return self.pub.publish()

        def pack(self):
            return self.pub.pack()

        def fingerprint(self) -> str:
            from weight_sync.receive import fingerprint

            return fingerprint(self.model.parameters(), self.dtype)

        def logits(self, tokens: list[int]) -> torch.Tensor:
            """(len(tokens), V) logits predicting each of `tokens` after PROMPT, with the weights in the engine dtype."""
            import copy

            model = copy.deepcopy(self.model).to(self.dtype)
            ids = torch.tensor([PROMPT + tokens], device="cuda")
            with torch.no_grad():
                out = model(ids).logits[0, len(PROMPT) - 1 : -1].float()
            return out.cpu()

    class Engine:
        async def start(self, model_dir: str, dtype: str) -> None:
            from rollout.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(model_path=model_dir, dtype=dtype, max_model_len=512, gpu_memory_utilization=0.3,
                                     enforce_eager=False, seed=0)  # CUDA graphs captured over the parameters
            await self.engine.start()

        async def regions(self) -> list:
            return await self.engine.weight_sync_regions()

        async def join(self, plan, address) -> None:
            await self.engine.init_weight_sync(plan, address, 1)

        async def open_ipc(self, plan, handle: bytes) -> None:
            await self.engine.init_weight_sync_ipc(plan, handle)

        async def receive(self) -> None:
            await self.engine.receive_weights()

        async def greedy(self) -> list[int]:
            from rollout.engine import SamplingSpec

            self.calls = getattr(self, "calls", 0) + 1
            seg = await self.engine.generate(f"greedy-{self.calls}", PROMPT,
                                             SamplingSpec(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
            return seg.token_ids

        async def fingerprint(self) -> str:
            return await self.engine.weights_fingerprint()

        async def close(self) -> None:
            await self.engine.close()

    return Trainer, Engine


def _check_greedy(tokens: list[int], logits: torch.Tensor, tol: float) -> None:
    assert len(tokens) == NEW_TOKENS
    chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]  # (T,)
    best = logits.max(dim=-1).values  # (T,)
    assert bool(((best - chosen) <= tol).all()), f"engine tokens off the argmax by {(best - chosen).tolist()}"
    exact = int((logits.argmax(dim=-1) == torch.tensor(tokens)).sum())
    assert exact >= 12, f"only {exact} of {len(tokens)} greedy tokens are the exact argmax"


def _three_publishes(ray, trainer, engine, publish, dtype: str) -> None:
    previous = ray.get(engine.greedy.remote())
    for seed in (1, 2, 3):
        ray.get(trainer.perturb.remote(seed))
        publish()
        assert ray.get(engine.fingerprint.remote()) == ray.get(trainer.fingerprint.remote())
        tokens = ray.get(engine.greedy.remote())
        _check_greedy(tokens, ray.get(trainer.logits.remote(tokens)), TOL[dtype])
        assert tokens != previous, f"publish {seed}: the engine still decodes what it did before"
        previous = tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nccl_publish_reaches_cuda_graphs(ray_local, gpu_model_dir, dtype):
    from weight_sync.messages import GroupAddress
    from weight_sync.plan import SyncPlan

    ray = ray_local
    if ray.cluster_resources().get("GPU", 0) < 2:
        pytest.skip("the NCCL route needs two GPUs")
    trainer_cls, engine_cls = _actor_classes()
    trainer = ray.remote(trainer_cls).options(num_cpus=1, num_gpus=1).remote(gpu_model_dir, dtype)
    engine = ray.remote(engine_cls).options(num_cpus=1, num_gpus=1).remote()
    try:
        ray.get(engine.start.remote(gpu_model_dir, dtype), timeout=600)
        plan = SyncPlan.build(ray.get(engine.regions.remote()), 64 << 20)
        ray.get(trainer.set_plan.remote(plan))
        address = GroupAddress(*ray.get(trainer.address.remote()), world_size=2, backend="nccl", timeout_s=120.0)
        ray.get([trainer.join.remote(address), engine.join.remote(plan, address)], timeout=300)

        def publish() -> None:  # one call each, concurrently: they meet in the broadcast
            ray.get([trainer.publish.remote(), engine.receive.remote()], timeout=120)

        _three_publishes(ray, trainer, engine, publish, dtype)
    finally:
        try:
            ray.get(engine.close.remote(), timeout=120)
        finally:
            ray.kill(engine)
            ray.kill(trainer)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ipc_publish_reaches_cuda_graphs_on_one_gpu(ray_local, gpu_model_dir, dtype):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from weight_sync.plan import SyncPlan

    ray = ray_local
    pg = placement_group([{"GPU": 1, "CPU": 2}], strategy="STRICT_PACK")  # one GPU, shared by both actors
    ray.get(pg.ready(), timeout=60)
    on_gpu = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    trainer_cls, engine_cls = _actor_classes()
    trainer = ray.remote(trainer_cls).options(num_cpus=1, num_gpus=0.5, scheduling_strategy=on_gpu).remote(
        gpu_model_dir, dtype)
    engine = ray.remote(engine_cls).options(num_cpus=1, num_gpus=0.5, scheduling_strategy=on_gpu).remote()
    try:
        ray.get(engine.start.remote(gpu_model_dir, dtype), timeout=600)
        plan = SyncPlan.build(ray.get(engine.regions.remote()), 64 << 20)
        ray.get(trainer.set_plan.remote(plan))
        ray.get(engine.open_ipc.remote(plan, ray.get(trainer.ipc_handle.remote())))  # once

        def publish() -> None:  # fill, then one device-to-device copy out of the same buffer
            ray.get(trainer.pack.remote())
            ray.get(engine.receive.remote(), timeout=120)

        _three_publishes(ray, trainer, engine, publish, dtype)
    finally:
        try:
            ray.get(engine.close.remote(), timeout=120)
        finally:
            ray.kill(engine)
            ray.kill(trainer)
            remove_placement_group(pg)
