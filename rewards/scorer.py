"""Reward-model scorers: Ray actors that score finished responses with a learned reward model, and the
rollout worker's side of calling them (docs/design.md section 3b).

    scorers = start_scorers(cfg, run_id, placement, n)  # rewards.model.path set: the actors (the fleet owns them)
    reward = ModelReward(cfg.rewards.model, scorer)   # in a rollout worker
    scores = await reward.score(sequences)            # raw scores; RewardModelFailure on a timeout or a dead actor

A scorer loads the model once (on CPU, on a GPU of its own, or on a fraction of one) and scores a
group's sequences (prompt + response token ids) in batches by a token budget, in its own process: the
rollout worker only awaits the result, so its event loop goes on generating meanwhile. With
rewards.model.normalize the scorer keeps the running mean and standard deviation of every score it
saw and returns normalised (and, with rewards.model.clip, clipped) rewards beside the raw scores.

A scorer that does not answer within rewards.model.timeout_s, or that died, fails the group: it is
dropped (reason `reward_model`, counted in accounting.json and `reward/model_errors`), its admission
slots freed, and the run goes on; Ray restarts a dead scorer (rewards.model.max_restarts). Dropped,
not retried: a timed-out scorer is most likely overloaded or restarting, and a retry would add to
its queue, while the freed slots let a fresh group start at once under the current weights.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
import torch

from rewards.reward_model import RunningNorm, load_reward_model, score_sequences

log = logging.getLogger(__name__)


class RewardModelFailure(RuntimeError):
    """The reward-model scorer of a group timed out or died: the group is dropped."""


class RewardModelScorer:
    """Ray actor: `ray.remote(RewardModelScorer).options(...).remote(model_cfg)`."""

    def __init__(self, model_cfg) -> None:
        self.cfg = model_cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray hides GPUs not assigned
        dtype = model_cfg.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(model_cfg.num_cpus)))
        self.model = load_reward_model(model_cfg.path, self.device, getattr(torch, dtype)).eval()
        self.pad_id = self.model.config.pad_token_id
        self.norm = RunningNorm() if model_cfg.normalize else None
        self.stats = {"calls": 0, "sequences": 0, "tokens": 0, "seconds": 0.0}

    def score(self, sequences: list[list[int]]) -> dict:
        """{"raw": the model's scores, "reward": normalised and clipped as configured} of each sequence."""
        t0 = time.perf_counter()
        raw = score_sequences(self.model, sequences, self.pad_id, self.cfg.max_tokens_per_batch)
        reward = raw
        if self.norm is not None:
            self.norm.update(raw)
            reward = self.norm.normalize(raw)
        if self.cfg.clip is not None:
            reward = [max(-self.cfg.clip, min(self.cfg.clip, r)) for r in reward]
        self.stats["calls"] += 1
        self.stats["sequences"] += len(sequences)
        self.stats["tokens"] += sum(len(s) for s in sequences)
        self.stats["seconds"] += time.perf_counter() - t0
        return {"raw": raw, "reward": reward}

    def get_stats(self) -> dict:
        return dict(self.stats)


def start_scorers(cfg, run_id: str, placement, count: int) -> list:
    """`count` scorer actors of rewards.model (rewards.model.num_scorers, or one per rollout worker), placed
    as `placement.scorer(i)` says, each restarted by Ray up to rewards.model.max_restarts times."""
    m = cfg.rewards.model
    actor = ray.remote(RewardModelScorer)
    return [actor.options(**placement.scorer(i), max_restarts=m.max_restarts,
                          name=f"tether:scorer:{i}:{run_id}").remote(m) for i in range(count)]


class ModelReward:
    """A rollout worker's handle on its scorer."""

    def __init__(self, model_cfg, scorer) -> None:
        self.cfg, self.scorer = model_cfg, scorer

    async def score(self, sequences: list[list[int]]) -> dict:
        try:
            return await asyncio.wait_for(self.scorer.score.remote(sequences), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            raise RewardModelFailure(f"the reward-model scorer did not answer within rewards.model.timeout_s="
                                     f"{self.cfg.timeout_s:g} s") from None
        except ray.exceptions.RayError as e:  # the actor died (Ray restarts it) or the call raised
            raise RewardModelFailure(f"the reward-model scorer failed: {str(e).splitlines()[0][:200]}") from None
