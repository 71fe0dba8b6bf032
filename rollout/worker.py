"""The rollout worker: a Ray actor holding one engine, generating prompt groups continuously.

Before each prompt group it asks the staleness service for admission (which also hands
out the next prompt of the data cursor). Every token is tagged with the policy version
the engine held when it was sampled. A publish (docs/design.md section 6) is one call, `publish`:
no new segments, in-flight ones aborted (or waited for when
`rollout.interrupt_on_publish=false`), the weights received, the version set, and (unless the
driver verifies first and calls `end_publish` itself) generation resumed; aborted responses
continue from the tokens they already have, under the new weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import zlib
from dataclasses import replace

import torch
from transformers import AutoTokenizer

from rewards.pool import RewardPool
from rewards.scorer import ModelReward, RewardModelFailure
from rewards.shaping import overlong_penalty
from rewards.tasks import build_task, render_prompt
from rollout.engine import Engine, SamplingSpec
from rollout.episode import EnvironmentFailure, EpisodeRunner, engine_sampler, gather_group
from rollout.forced_length import forced_length_of
from rollout.trajectory import Trajectory
from weight_sync.messages import GroupAddress, PublishReport
from weight_sync.plan import Region, SyncPlan

log = logging.getLogger(__name__)


class _Shutdown(Exception):
    pass


def build_engine(rollout_cfg, model_cfg, model_dir: str, seed: int) -> Engine:
    if rollout_cfg.engine == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_path=model_dir,
            dtype=model_cfg.dtype,
            max_model_len=rollout_cfg.max_model_len,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            kv_cache_gib=rollout_cfg.kv_cache_gib,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            enforce_eager=rollout_cfg.enforce_eager,
            seed=seed,
        )
    from rollout.hf_engine import HFEngine

    return HFEngine(model_dir, dtype=model_cfg.dtype, device="cuda" if torch.cuda.is_available() else "cpu")


class RolloutWorker:
    """Ray actor (async): `ray.remote(RolloutWorker).options(...).remote(...)`."""

    def __init__(self, worker_index: int, cfg, model_dir: str, service, scorers: list | None = None) -> None:
        logging.basicConfig(level=cfg.logger.log_level, format="%(asctime)s %(name)s: %(message)s")
        self.index = worker_index
        self.cfg = cfg
        self.model_dir = model_dir
        self.service = service
        self.task = build_task(cfg.task)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.engine: Engine | None = None
        self.rewards: RewardPool | None = None
        self.version = 0
        self._weights_ready: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._inflight = 0
        self._stopping = False
        self._loops: list[asyncio.Task] = []
        self._engine_lost_logged = False
        self.incarnation = uuid.uuid4().hex  # a restarted actor (same handle, new process) gets a new one
        self.stats = {"interrupted": 0, "generated_tokens": 0, "gen_time_s": 0.0, "reward_errors": 0, "groups": 0,
                      "reward_model_errors": 0}
        # a learned reward beside the rule reward: this worker's scorer of the fleet's pool (rewards/scorer.py)
        self.model_reward = ModelReward(cfg.rewards.model, scorers[worker_index % len(scorers)]) if scorers else None
        # multi-turn episodes with the config's environment (rollout/episode.py); None = single responses
        self.episodes = EpisodeRunner(cfg, self.tokenizer, self.task, self.stats) if cfg.env is not None else None

    async def ping(self) -> dict:
        """Liveness and identity: the driver compares `incarnation` to spot a restart. `engine_dead`
        (why, or None) marks a live actor whose engine died: lost all the same, the driver restarts it."""
        return {"incarnation": self.incarnation, "pid": os.getpid(), "started": self.engine is not None,
                "engine_dead": None if self.engine is None else self.engine.dead()}

    async def start(self) -> None:
        """Build the engine (seconds for HF, tens of seconds for vLLM)."""
        self._weights_ready = asyncio.Event()
        self._weights_ready.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.rewards = RewardPool(self.task.reward_fn, self.cfg.rewards.num_workers, self.cfg.rewards.timeout_s)
        self.engine = build_engine(self.cfg.rollout, self.cfg.model, self.model_dir, self.cfg.seed + self.index)
        if hasattr(self.engine, "start"):
            await self.engine.start()

    # ---- weight sync -------------------------------------------------------------------
    async def weight_sync_regions(self) -> list[Region]:
        return await self.engine.weight_sync_regions()

    async def init_weight_sync(self, plan: SyncPlan, address: GroupAddress, rank: int) -> None:
        await self.engine.init_weight_sync(plan, address, rank)

    async def init_weight_sync_ipc(self, plan: SyncPlan, handle: bytes) -> None:
        await self.engine.init_weight_sync_ipc(plan, handle)

    async def publish(self, version: int, resume: bool = True) -> PublishReport:
        """Pause generation, receive version `version` (a collective with the trainer), and resume
        unless `resume=False` (the driver then calls `end_publish`, e.g. after verifying the weights).
        Returns the requests interrupted and the seconds of the pause and of the weight transfer."""
        t0 = time.perf_counter()
        interrupted = await self.begin_publish()
        t1 = time.perf_counter()
        await self.engine.receive_weights()
        self.version = version
        if resume:
            self._weights_ready.set()
        return PublishReport(interrupted, pause_s=t1 - t0, receive_s=time.perf_counter() - t1)

    async def begin_publish(self) -> int:
        """Stop starting segments; abort (or wait for) in-flight ones. Returns how many were interrupted."""
        self._weights_ready.clear()
        interrupted = 0
        if self.cfg.rollout.interrupt_on_publish:
            while self._inflight > 0:
                # abort_all again until every segment returned: one may have been submitted
                # between the event clear and the first abort
                interrupted += await self.engine.abort_all()
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout=0.05)
                except asyncio.TimeoutError:
                    pass
        else:
            await self._idle.wait()
        self.stats["interrupted"] += interrupted
        return interrupted

    async def end_publish(self) -> None:
        self._weights_ready.set()

    async def fingerprint(self) -> str:
        return await self.engine.weights_fingerprint()

    async def get_version(self) -> int:
        return self.version

    # ---- generation --------------------------------------------------------------------
    async def _segment(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec):
        self._inflight += 1
        self._idle.clear()
        try:
            return await self.engine.generate(request_id, prompt_ids, spec)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _sample(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> dict:
        """One response, continued across publishes (interruptible generation)."""
        tokens: list[int] = []
        logps: list[float] = []
        versions: list[int] = []
        interruptions = 0
        while True:
            await self._weights_ready.wait()
            if self._stopping:
                raise _Shutdown
            version = self.version  # weights change only while _weights_ready is clear
            remaining = replace(
                spec,
                max_tokens=spec.max_tokens - len(tokens),
                min_tokens=max(0, spec.min_tokens - len(tokens)),
                seed=None if spec.seed is None else spec.seed + interruptions,
            )
            t0 = time.perf_counter()
            seg = await self._segment(f"{request_id}.{interruptions}", prompt_ids + tokens, remaining)
            self.stats["gen_time_s"] += time.perf_counter() - t0
            tokens += seg.token_ids
            logps += seg.logprobs
            versions += [version] * len(seg.token_ids)
            self.stats["generated_tokens"] += len(seg.token_ids)
            if seg.finish_reason != "abort":
                return {"tokens": tokens, "logps": logps, "versions": versions,
                        "finish_reason": seg.finish_reason, "interruptions": interruptions}
            if self._stopping:
                raise _Shutdown
            if len(tokens) >= spec.max_tokens:
                return {"tokens": tokens, "logps": logps, "versions": versions,
                        "finish_reason": "length", "interruptions": interruptions}
            interruptions += 1

    async def _score(self, text: str, answer: str) -> tuple[float, bool]:
        """Reward in the process pool: an exception, crash or timeout gives 0 and is counted
        (the pool logs the first of each kind with its traceback)."""
        reward, error = await self.rewards.score(text, answer)
        if error is not None:
            self.stats["reward_errors"] += 1
        return reward, error is not None

    def _force_length(self, spec: SamplingSpec, seq: int, sample: int) -> SamplingSpec:
        """With `rollout.forced_length_*` set: exactly the drawn number of tokens, EOS ignored."""
        length = forced_length_of(self.cfg, seq, sample)
        if length is None:
            return spec
        return replace(spec, max_tokens=length, min_tokens=length, ignore_eos=True)

    async def _rollout_group(self, ticket: dict) -> list[Trajectory]:
        """G samples of one prompt; with ReMax also its greedy response, the baseline.

        ReMax (Li et al. arXiv 2310.10505) uses r(greedy(x)) as the baseline of every sample of x.
        The greedy response is generated here with the group, by the same engine under the same
        weights version, and tagged like the samples. If a publish interrupts it, it continues under
        the new weights like any sample: the baseline is then the greedy decoding of the policies the
        response spanned (at most a few versions apart). It still does not depend on the sampled
        responses, so the gradient estimate stays unbiased; only its variance reduction is a little
        less tight.
        """
        problem = self.task.train[ticket["prompt_index"]]
        prompt_ids = render_prompt(self.task, self.tokenizer, problem.question)
        g = self.cfg.trainer.group_size
        base_seed = zlib.crc32(f"{self.cfg.seed}-{ticket['seq']}".encode())
        spec = SamplingSpec(max_tokens=self.cfg.rollout.max_new_tokens, temperature=self.cfg.rollout.temperature,
                            top_p=self.cfg.rollout.top_p)
        specs = [(str(k), replace(spec, seed=base_seed + 1000 * k)) for k in range(g)]
        if self.cfg.algorithm.advantage == "remax":
            specs.append(("b", replace(spec, temperature=0.0)))
        specs = [(k, self._force_length(sp, ticket["seq"], i)) for i, (k, sp) in enumerate(specs)]
        if self.episodes is None:
            samples = await asyncio.gather(*(
                self._sample(f"w{self.index}-{ticket['seq']}-{k}", prompt_ids, sp) for k, sp in specs
            ))
        else:  # episodes: the environment gives the prompt and the reward
            row = {"question": problem.question, "answer": problem.answer, "index": ticket["prompt_index"], "split": "train"}
            samples = await gather_group(
                self.episodes.run(f"w{self.index}-{ticket['seq']}-{k}", row, sp, self._sample) for k, sp in specs
            )
        group = []
        alg, rw = self.cfg.algorithm, self.cfg.rewards
        limit = self.cfg.rollout.max_new_tokens if self.episodes is None else self.cfg.rollout.max_episode_tokens
        scored = None
        if self.model_reward is not None:  # the whole group in one call, off this event loop
            scored = await self.model_reward.score([s.get("prompt_ids", prompt_ids) + s["tokens"] for s in samples])
        for i, ((k, _), s) in enumerate(zip(specs, samples)):
            if self.episodes is None:
                text = self.tokenizer.decode(s["tokens"], skip_special_tokens=True)
                task_reward, failed = await self._score(text, problem.answer)
            else:
                text, task_reward, failed = s["text"], s["reward"], False
            penalty = overlong_penalty(len(s["tokens"]), limit, alg.overlong_buffer, alg.overlong_penalty)
            parts = {"task": task_reward}  # each reward on its own: reward/<name>_mean
            reward = rw.rule_weight * task_reward + penalty
            if scored is not None:
                parts[rw.model.name] = scored["raw"][i]
                reward += rw.model.weight * scored["reward"][i]
            group.append(Trajectory(
                traj_id=f"{ticket['seq']}-{k}", prompt_index=ticket["prompt_index"], group_id=str(ticket["seq"]),
                prompt_ids=s.get("prompt_ids", prompt_ids), response_ids=s["tokens"], logp_behav=s["logps"],
                versions=s["versions"], start_version=ticket["version"], reward=reward, finish_reason=s["finish_reason"],
                interruptions=s["interruptions"], reward_error=failed,
                info={"text": text, "task_reward": task_reward, "overlong_penalty": penalty, "rewards": parts,
                      **s.get("info", {})},
                is_baseline=(k == "b"), loss_mask=s.get("loss_mask"),
            ))
        self.stats["groups"] += 1
        return group

    async def _loop(self) -> None:
        g = self.cfg.trainer.group_size
        while not self._stopping and not self._engine_lost():
            ticket = await self.service.acquire.remote(g, self.incarnation)
            if ticket is None:  # the service stopped admitting: the run is ending
                return
            try:
                group = await self._rollout_group(ticket)
            except _Shutdown:
                await self.service.drop.remote(ticket["seq"], "shutdown")
                return
            except RewardModelFailure as e:
                self.stats["reward_model_errors"] += 1
                log.warning("rollout group %s dropped (reward_model): %s", ticket["seq"], e)
                await self.service.drop.remote(ticket["seq"], "reward_model")
                continue
            except Exception:
                if self._engine_lost():
                    # Its ticket stays running: the driver sees the dead engine in `ping`, drops this
                    # incarnation's running rollouts as worker_lost (prompts re-issued) and restarts the actor.
                    return
                log.exception("rollout group %s failed; its %d rollouts are dropped", ticket["seq"], g)
                await self.service.drop.remote(ticket["seq"], "error")
                continue
            await self.service.put.remote(group)

    def _engine_lost(self) -> bool:
        """True once the engine is dead (logged once): generation stops until the driver restarts this actor."""
        reason = self.engine.dead()
        if reason is not None and not self._engine_lost_logged:
            self._engine_lost_logged = True
            log.error("rollout worker %d (pid %d): %s; it generates nothing more until the driver restarts it",
                      self.index, os.getpid(), reason)
        return reason is not None

    async def run(self) -> None:
        """Start the generation loops (returns at once; they run until `stop`; again after a `stop`)."""
        self._stopping = False
        self._loops = [asyncio.create_task(self._loop()) for _ in range(self.cfg.rollout.max_concurrent_groups)]

    async def stop(self) -> dict:
        self._stopping = True
        self._weights_ready.set()
        await self.engine.abort_all()
        await asyncio.gather(*self._loops, return_exceptions=True)
        return dict(self.stats)

    async def get_stats(self) -> dict:
        return dict(self.stats)

    # ---- evaluation --------------------------------------------------------------------
    async def evaluate(self, indices: list[int], max_new_tokens: int) -> list[dict]:
        """Greedy answers to eval problems under the current weights."""
        spec = SamplingSpec(max_tokens=max_new_tokens, temperature=0.0)

        async def one(i: int) -> dict:
            problem = self.task.eval[i]
            if self.episodes is not None:  # a greedy episode; one whose environment fails scores 0 (counted, logged)
                row = {"question": problem.question, "answer": problem.answer, "index": i, "split": "eval"}
                try:
                    ep = await self.episodes.run(f"eval-w{self.index}-v{self.version}-{i}", row, spec,
                                                 engine_sampler(self.engine, self.version))
                except EnvironmentFailure as e:
                    log.warning("eval episode %d scores 0: %s", i, e)
                    return {"index": i, "reward": 0.0, "text": "", "answer": problem.answer, "env_error": str(e)}
                return {"index": i, "reward": ep["reward"], "text": ep["text"], "answer": problem.answer, **ep["info"]}
            prompt_ids = render_prompt(self.task, self.tokenizer, problem.question)
            seg = await self.engine.generate(f"eval-w{self.index}-v{self.version}-{i}", prompt_ids, spec)
            text = self.tokenizer.decode(seg.token_ids, skip_special_tokens=True)
            reward, _ = await self._score(text, problem.answer)
            return {"index": i, "reward": reward, "text": text, "answer": problem.answer}

        return list(await asyncio.gather(*(one(i) for i in indices)))

    async def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        if self.engine is not None:
            await self.engine.close()
