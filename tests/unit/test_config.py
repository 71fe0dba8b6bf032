"""Structured-config validation: one line naming the key, the value and the fix."""

import pytest

from configs.schema import ConfigError, validate
from tests.conftest import compose


def _error(overrides):
    with pytest.raises(ConfigError) as e:
        validate(compose(["output_dir=/tmp/unused", *overrides]))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_valid():
    validate(compose(["output_dir=/tmp/unused"]))


@pytest.mark.parametrize("override,key", [
    ("staleness.max_staleness=-1", "staleness.max_staleness"),
    ("trainer.batch_size=30", "trainer.batch_size"),  # not a multiple of group_size=8
    ("trainer.lr=0", "trainer.lr"),
    ("rollout.engine=sglang", "rollout.engine"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("rollout.num_workers=0", "rollout.num_workers"),
    ("algorithm.advantage=ppo", "algorithm.advantage"),
    ("algorithm.behav_weight_cap_mode=soft", "algorithm.behav_weight_cap_mode"),
    ("algorithm.ewma_decay=1.0", "algorithm.ewma_decay"),
    ("algorithm.kl_estimator=k2", "algorithm.kl_estimator"),
    ("weight_sync.bucket_mb=0", "weight_sync.bucket_mb"),
    ("model.name=gpt2", "model.name"),
    ("batch_invariance.reference_batch_size=0", "batch_invariance.reference_batch_size"),
])
def test_bad_values_name_the_key(override, key):
    assert _error([override]).startswith(key)


def test_invalid_combination_ewma_with_coupled_ppo():
    msg = _error(["algorithm.proximal=ewma", "algorithm.loss=ppo"])
    assert msg.startswith("algorithm.proximal='ewma'") and "decoupled_ppo" in msg


def test_staleness_message_says_how_to_fix():
    assert _error(["staleness.max_staleness=-1"]) == (
        "staleness.max_staleness=-1 must be >= 0; use 0 for synchronous training")
