"""Reward shaping applied to every training sample's task reward (not to evaluation).

    overlong_penalty(length, max_length, buffer, factor) -> float <= 0

DAPO's soft overlong punishment (Yu et al. arXiv 2503.14476, eq. 13; AReaL's
`overlong_reward_penalty`): with L_max = rollout.max_new_tokens and L_cache = the buffer,
    R_length(y) = 0                                   |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
so the penalty grows linearly from 0 to -factor over the last L_cache tokens before the limit
(a response cannot exceed L_max here: the engine stops it there).
"""

from __future__ import annotations


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float) -> float:
    if buffer <= 0:
        return 0.0
    if not 0 < buffer < max_length:
        raise ValueError(f"algorithm.overlong_buffer={buffer} must be in [0, rollout.max_new_tokens={max_length})")
    start = max_length - buffer
    return -factor * max(0, min(length, max_length) - start) / buffer
