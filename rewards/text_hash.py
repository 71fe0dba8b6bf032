"""A reward for throughput benchmarks: a pseudo-random number in [0, 1) fixed by the response text.

It is deterministic (the same text always gets the same reward, in every system and process) and
almost never ties inside a group, so every group has non-zero advantages and every trajectory goes
through the trainer's forward and backward passes. With a sparse task reward on forced-length
responses most groups would score all 0, and a trainer that skips zero-advantage trajectories
(ours does) would do almost no work: the benchmark would then measure nothing. It carries no
learning signal.
"""

from __future__ import annotations

import zlib


def text_hash_reward(response: str, answer: str) -> float:
    """crc32 of the response, scaled to [0, 1); `answer` is ignored."""
    return zlib.crc32(response.encode()) / 2**32
