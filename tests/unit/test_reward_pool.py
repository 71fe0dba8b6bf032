"""RewardPool: a reward fn that raises, hangs, crashes or returns junk costs one 0.0, and the pool goes on.

The reward fns are module-level so the worker processes can import them by name.
"""

import asyncio
import ctypes
import logging
import os
import time

import pytest

from rewards.pool import RewardPool

TIMEOUT_S = 1.5


def misbehaving(response: str, answer: str) -> float:
    """Misbehaves as `response` says; otherwise 1.0 on an exact match."""
    if response == "raise":
        raise ValueError("boom")
    if response == "hang":
        time.sleep(3600)
    if response == "nan":
        return float("nan")
    if response == "text":
        return "1.0"  # type: ignore[return-value]
    if response == "exit":
        os._exit(3)
    if response == "segfault":
        ctypes.string_at(0)
    if response == "print":
        print("stray output must not corrupt the protocol")
    return float(response == answer)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def pool():
    p = RewardPool(misbehaving, num_workers=1, timeout_s=TIMEOUT_S)  # one worker: recovery is the same slot
    yield p
    p.close()


@pytest.mark.parametrize("trigger,kind", [
    ("raise", "exception"),
    ("hang", "timeout"),
    ("nan", "invalid"),
    ("text", "invalid"),
    ("exit", "crash"),
    ("segfault", "crash"),
])
def test_failure_scores_zero_is_counted_and_the_pool_recovers(pool, trigger, kind):
    async def go():
        start = time.monotonic()
        bad = await pool.score(trigger, "x")
        elapsed = time.monotonic() - start
        good = await pool.score("42", "42")
        return bad, elapsed, good

    bad, elapsed, good = run(go())
    assert bad == (0.0, kind)
    assert good == (1.0, None)
    if kind == "timeout":  # the call is cut at timeout_s (+ worker start-up), not at the reward fn's 3600 s
        assert elapsed < TIMEOUT_S + 10
    stats = pool.stats()
    assert stats["calls"] == 2 and stats["ok"] == 1
    assert stats["errors"][kind] == 1 and sum(stats["errors"].values()) == 1
    assert stats["worker_restarts"] == (1 if kind in ("timeout", "crash") else 0)


def test_errors_are_logged_once_with_the_first_traceback(pool, caplog):
    async def go():
        return [await pool.score("raise", "x") for _ in range(3)]

    with caplog.at_level(logging.WARNING, logger="rewards.pool"):
        assert run(go()) == [(0.0, "exception")] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ValueError: boom" in warnings[0].getMessage() and "Traceback" in warnings[0].getMessage()
    assert pool.stats()["errors"]["exception"] == 3


def test_stray_prints_do_not_break_the_protocol(pool):
    assert run(pool.score("print", "print")) == (1.0, None)


def test_many_concurrent_calls():
    with RewardPool(misbehaving, num_workers=3, timeout_s=TIMEOUT_S) as pool:
        async def go():
            return await asyncio.gather(*(pool.score(str(i), str(i % 2)) for i in range(40)))

        results = run(go())
        assert results == [(1.0 if i < 2 else 0.0, None) for i in range(40)]  # str(i) == str(i % 2) for 0 and 1
        assert pool.stats() == {"calls": 40, "ok": 40, "worker_restarts": 0,
                                "errors": {"exception": 0, "timeout": 0, "crash": 0, "invalid": 0}}


def test_a_hung_call_does_not_block_the_others():
    with RewardPool(misbehaving, num_workers=2, timeout_s=3.0) as pool:
        async def timed(response):
            result = await pool.score(response, "ok")
            return result, time.monotonic()

        async def go():
            return await asyncio.gather(timed("hang"), *(timed("ok") for _ in range(6)))

        (hung, hung_done), *rest = run(go())
        assert hung == (0.0, "timeout")
        assert all(result == (1.0, None) for result, _ in rest)
        assert all(done < hung_done for _, done in rest)  # served by the other worker meanwhile


def test_an_unpicklable_reward_fn_is_a_clear_error():
    with pytest.raises(TypeError, match="module-level function"):
        RewardPool(lambda r, a: 1.0, num_workers=1, timeout_s=1.0)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="num_workers=0"):
        RewardPool(misbehaving, num_workers=0, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s=0"):
        RewardPool(misbehaving, num_workers=1, timeout_s=0)


def test_score_after_close_raises(pool):
    pool.close()
    with pytest.raises(RuntimeError, match="after close"):
        run(pool.score("1", "1"))


def test_the_code_task_reward_through_the_pool():
    from rewards.code_task import python_exec_reward

    tests = "assert _same(add(2, 3), 5)"
    with RewardPool(python_exec_reward, num_workers=2, timeout_s=10.0) as pool:
        async def go():
            return await asyncio.gather(pool.score("def add(a, b):\n    return a + b", tests),
                                        pool.score("def add(a, b):\n    return a * b", tests))

        assert run(go()) == [(1.0, None), (0.0, None)]
