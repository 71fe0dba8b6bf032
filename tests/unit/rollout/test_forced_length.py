"""Forced response lengths (rollout.forced_length_*): deterministic, log-normal, clipped, validated."""

import statistics

import pytest

from configs.schema import ConfigError, validate
from rollout.forced_length import forced_length, forced_length_of
from tests.conftest import compose


def test_same_inputs_same_length_other_inputs_other_lengths():
    assert forced_length(0, 5, 3, 256, 1.0, 2048) == forced_length(0, 5, 3, 256, 1.0, 2048)
    draws = {forced_length(seed, seq, k, 256, 1.0, 2048) for seed in (0, 1) for seq in range(4) for k in range(4)}
    assert len(draws) > 20  # 32 draws of a continuous distribution: nearly all distinct


def test_median_and_tail_match_the_log_normal():
    lengths = [forced_length(0, seq, k, 256, 1.0, 2048) for seq in range(500) for k in range(8)]
    # 4000 draws: the sample median of LogNormal(log 256, 1) is within a few percent of 256
    assert 230 <= statistics.median(lengths) <= 285
    # P(X > 2048) = P(Z > log(8)) = P(Z > 2.08) ~ 1.9 %, and those draws are clipped to 2048
    clipped = sum(n == 2048 for n in lengths) / len(lengths)
    assert 0.01 <= clipped <= 0.03
    assert max(lengths) == 2048 and min(lengths) >= 1


def test_clipped_to_one_and_max():
    assert all(1 <= forced_length(0, seq, 0, 1, 3.0, 4) <= 4 for seq in range(200))
    assert {forced_length(0, seq, 0, 1, 3.0, 4) for seq in range(200)} == {1, 2, 3, 4}
    assert forced_length(0, 0, 0, 7, 0.0, 100) == 7  # sigma 0: exactly the median


def test_off_by_default_and_max_defaults_to_max_new_tokens():
    cfg = compose(["output_dir=/tmp/unused"])
    assert forced_length_of(cfg, 0, 0) is None
    cfg = compose(["output_dir=/tmp/unused", "rollout.forced_length_median=8", "rollout.forced_length_sigma=5",
                   "rollout.max_new_tokens=16"])
    assert max(forced_length_of(cfg, seq, 0) for seq in range(100)) == 16


@pytest.mark.parametrize("overrides,message", [
    (["rollout.forced_length_median=0"], "rollout.forced_length_median=0 must be >= 1 token"),
    (["rollout.forced_length_median=8", "rollout.forced_length_sigma=-1"], "rollout.forced_length_sigma=-1.0 must be >= 0"),
    (["rollout.forced_length_median=8", "rollout.forced_length_max=4"], "rollout.forced_length_max=4 must be >= rollout.forced_length_median=8"),
    (["rollout.forced_length_median=8", "rollout.forced_length_max=64"], "rollout.forced_length_max=64 must be <= rollout.max_new_tokens=32; raise rollout.max_new_tokens"),
    (["rollout.forced_length_median=64"], "rollout.forced_length_max=32 must be >= rollout.forced_length_median=64"),
])
def test_bad_values_name_key_value_and_fix(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose(["output_dir=/tmp/unused", *overrides]))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
