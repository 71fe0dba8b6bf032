"""Forced response lengths: the benchmark workload (`rollout.forced_length_*`).

Every sample's length is drawn from a log-normal with the given median and sigma, clipped to
[1, max], from a seed made of (run seed, group sequence number, sample index) only. The engine
then generates exactly that many tokens (max_tokens = min_tokens = length, EOS ignored), so two
systems, or the same system with two staleness bounds, generate and train on the same number of
tokens for the same group, whatever the weights make the model say. The lengths do not depend
on the order in which groups finish, the number of workers or the engine.
"""

from __future__ import annotations

import math
import random
import zlib


def forced_length(seed: int, seq: int, sample: int, median: int, sigma: float, max_len: int) -> int:
    """Length of sample `sample` of group `seq`: round(LogNormal(log(median), sigma)) clipped to [1, max_len]."""
    rng = random.Random(zlib.crc32(f"forced-length-{seed}-{seq}-{sample}".encode()))
    draw = rng.lognormvariate(math.log(median), sigma)
    return max(1, min(max_len, round(draw)))


def forced_length_of(cfg, seq: int, sample: int) -> int | None:
    """The forced length of a sample under `cfg` (the whole run config), or None when the option is off."""
    r = cfg.rollout
    if r.forced_length_median is None:
        return None
    max_len = r.forced_length_max if r.forced_length_max is not None else r.max_new_tokens
    return forced_length(cfg.seed, seq, sample, r.forced_length_median, r.forced_length_sigma, max_len)
