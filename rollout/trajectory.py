"""The trajectory record shared by rollout/ and trainer/ (the only type both import)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Trajectory:
    """One sampled response to one prompt, with everything the trainer needs.

    A response produced by interruptible generation spans several policy versions;
    each token keeps the version and the log-prob of the policy that sampled it.
    """

    traj_id: str  # unique across the run: "<prompt_index>-<sample_index>"
    prompt_index: int  # index of the prompt in the task's train split (data cursor order)
    group_id: str  # all samples of one prompt share it (GRPO / RLOO / ReMax groups)
    prompt_ids: list[int]
    response_ids: list[int]
    logp_behav: list[float]  # per response token, as recorded by the engine
    versions: list[int]  # per response token: the policy version that produced it
    start_version: int  # policy version when the rollout was admitted
    reward: float = 0.0
    finish_reason: str = "stop"  # "stop" | "length"
    is_baseline: bool = False  # ReMax greedy response: used as the baseline, not trained on
    interruptions: int = 0  # how many publishes this response lived through
    reward_error: bool = False
    info: dict = field(default_factory=dict)
    # per response token: 1 = written by the model (trained on), 0 = context it did not write (a tool's
    # output in a multi-turn episode); None = every token is the model's
    loss_mask: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if len(self.logp_behav) != n or len(self.versions) != n:
            raise ValueError(
                f"Trajectory {self.traj_id}: response has {n} tokens but "
                f"{len(self.logp_behav)} log-probs and {len(self.versions)} versions"
            )
        if self.loss_mask is not None and len(self.loss_mask) != n:
            raise ValueError(f"Trajectory {self.traj_id}: response has {n} tokens but a loss mask of {len(self.loss_mask)}")

    def loss_weights(self) -> list[float]:
        """Per response token, 1.0 where the loss applies (the model's tokens), else 0.0."""
        if self.loss_mask is None:
            return [1.0] * len(self.response_ids)
        return [float(m) for m in self.loss_mask]

    @property
    def num_trained_tokens(self) -> int:
        """Response tokens the loss applies to (the token-mean denominator counts these)."""
        return len(self.response_ids) if self.loss_mask is None else int(sum(self.loss_mask))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)
