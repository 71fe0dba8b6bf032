"""A checkpoint of the staleness service: groups admitted but not consumed are handed out again."""

import asyncio

from staleness.service import StalenessService
from tests.helpers import ticket_group as _group


def test_restore_requeues_outstanding_prompts_and_keeps_the_identity():
    async def scenario():
        svc = StalenessService(batch_size=4, max_staleness=2, max_running=None, num_prompts=10, seed=3)
        tickets = [await svc.acquire(2, "w0") for _ in range(5)]  # 10 admitted
        for t in tickets[:3]:
            await svc.put(_group(t, 2))
        await svc.get_batch(4)  # groups 0 and 1 consumed; 2 buffered; 3 and 4 running
        await svc.drop(tickets[4]["seq"], "error")  # group 4 failed: dropped, not outstanding
        await svc.pause()
        snap = await svc.snapshot()

        fresh = StalenessService(batch_size=4, max_staleness=2, max_running=None, num_prompts=10, seed=3)
        await fresh.restore(snap)
        acc = await fresh.accounting()
        assert acc["identity_holds"] and acc["in_flight"] == 0
        assert acc["admitted"] == 6 and acc["consumed"] == 4 and acc["dropped"] == {"error": 2}
        again = [await fresh.acquire(2, "w0") for _ in range(3)]
        # groups 2 (buffered) and 3 (running) come back first, under new ticket numbers; then new data
        assert [t["prompt_index"] for t in again[:2]] == [tickets[2]["prompt_index"], tickets[3]["prompt_index"]]
        assert [t["seq"] for t in again] == [5, 6, 7]
        # the next new prompt is the one the uninterrupted service would have drawn next
        await svc.resume()
        assert again[2]["prompt_index"] == (await svc.acquire(2, "w0"))["prompt_index"]
        assert (await fresh.accounting())["requeued_on_resume"] == 2

    asyncio.run(scenario())


def test_worker_lost_drops_its_running_groups_and_reissues_their_prompts():
    async def scenario():
        svc = StalenessService(batch_size=4, max_staleness=3, max_running=None, num_prompts=10, seed=0)
        a0, b0, a1 = await svc.acquire(2, "w0"), await svc.acquire(2, "w1"), await svc.acquire(2, "w0")
        await svc.put(_group(a0, 2))  # worker 0 finished one group before dying
        assert await svc.worker_lost("w0") == 2  # a1 was running on worker 0
        acc = await svc.accounting()
        assert acc["dropped"] == {"worker_lost": 2} and acc["identity_holds"]
        await svc.put(_group(a1, 2))  # a late result of the lost group is discarded, not counted twice
        assert (await svc.accounting())["buffered"] == 2
        again = await svc.acquire(2, "w1")
        assert again["prompt_index"] == a1["prompt_index"] and again["seq"] not in (a0["seq"], b0["seq"], a1["seq"])
        assert await svc.acquire(2, "w0") is None  # a request from the dead process admits nothing

    asyncio.run(scenario())


def test_prompt_order_is_what_the_service_hands_out():
    from staleness.service import prompt_order

    async def scenario():
        svc = StalenessService(batch_size=4, max_staleness=100, max_running=None, num_prompts=5, seed=7)
        return [(await svc.acquire(1, "w"))["prompt_index"] for _ in range(12)]  # over three epochs

    assert asyncio.run(scenario()) == prompt_order(5, 7, 12)


def test_stale_groups_dropped_by_get_batch_free_their_slots():
    # the scripted case: B = 2, G = 2, eta = 1; admit 4, finish them, consume 2, publish version 1, and
    # the other 2 are stale at version 2: the rule must allow admitting up to capacity again
    async def scenario():
        svc = StalenessService(batch_size=2, max_staleness=1, max_running=None, num_prompts=10, seed=0)
        t0, t1 = await svc.acquire(2, "w0"), await svc.acquire(2, "w0")
        await svc.put(_group(t0, 2))
        await svc.put(_group(t1, 2))
        await svc.get_batch(2)  # group 0, at version 0
        await svc.set_version(1)
        await svc.set_version(2)  # group 1 started at version 0: lag 2 > eta = 1
        fresh = await svc.acquire(2, "w0")  # capacity (2 + 1 + 1) * 2 = 8; accepted 4: admitted
        await svc.put(_group(fresh, 2))
        batch = await svc.get_batch(2)  # group 1 is dropped as stale, the fresh one is trained on
        assert {t.group_id for t in batch} == {str(fresh["seq"])}
        acc = await svc.accounting()
        assert acc["dropped"] == {"stale": 2} and acc["identity_holds"]
        # accepted = the 4 consumed; capacity 8 leaves 4 slots: two more groups, not one
        assert [await asyncio.wait_for(svc.acquire(2, "w0"), 1) for _ in range(2)]
        assert not svc.ctl.can_admit(2)

    asyncio.run(scenario())


def test_zero_variance_groups_are_dropped_before_the_buffer():
    async def scenario():
        svc = StalenessService(batch_size=2, max_staleness=0, max_running=None, num_prompts=10, seed=0,
                               drop_zero_variance=True)
        flat, mixed = await svc.acquire(2, "w0"), None
        await svc.put(_group(flat, 2))  # rewards 0, 0: no signal
        assert svc.ctl.can_admit(2)  # its slots came back: synchronous eta = 0 still admits a group
        mixed = await svc.acquire(2, "w0")
        group = _group(mixed, 2)
        group[0].reward = 1.0
        await svc.put(group)
        batch = await svc.get_batch(2)
        assert {t.group_id for t in batch} == {str(mixed["seq"])}
        acc = await svc.accounting()
        assert acc["dropped"] == {"zero_variance": 2} and acc["consumed"] == 2 and acc["identity_holds"]

    asyncio.run(scenario())


def test_fixed_lag_trains_each_batch_exactly_k_versions_after_it_started():
    # B = 2 (one group of 2), eta = k = 2: batches at versions 0, 1, 2 come from version 0 (lags 0, 1, 2),
    # then every batch is exactly 2 versions old, however fast newer groups finish
    async def scenario():
        svc = StalenessService(batch_size=2, max_staleness=2, max_running=None, num_prompts=50, seed=0, fixed_lag=2)
        lags = []
        for version in range(6):
            await svc.set_version(version)
            while svc.ctl.can_admit(2):
                await svc.put(_group(await svc.acquire(2, "w0"), 2))  # finishes at once, newest last
            batch = await svc.get_batch(2)
            lags.append(version - batch[0].start_version)
        assert lags == [0, 1, 2, 2, 2, 2]
        assert (await svc.accounting())["identity_holds"]

    asyncio.run(scenario())


async def _generate(svc, seconds_per_group, stop):
    """A rollout worker with one slot: admit a group, take `seconds_per_group` to finish it, repeat."""
    while not stop.is_set():
        ticket = await svc.acquire(2, "w0")
        if ticket is None:
            return
        await asyncio.sleep(seconds_per_group)
        await svc.put(_group(ticket, 2))


def test_fixed_lag_holds_when_the_trainer_is_faster_than_admission():
    # The driver asks for a batch as soon as one is ready, while the worker is still admitting version
    # 0's share of the pipeline ((k + 1) B = 6 rollouts). Before the fix the versions ran ahead of the
    # admissions: at version 2 nothing started at version 0 was left and get_batch waited forever.
    async def scenario():
        svc = StalenessService(batch_size=2, max_staleness=2, max_running=None, num_prompts=50, seed=0, fixed_lag=2)
        stop = asyncio.Event()
        worker = asyncio.ensure_future(_generate(svc, 0.01, stop))
        lags = []
        for version in range(6):
            batch = await asyncio.wait_for(svc.get_batch(2), timeout=10)
            lags.append(version - batch[0].start_version)
            await svc.pause()
            await svc.set_version(version + 1)
            await svc.resume()
        stop.set()
        await svc.stop()
        await worker
        assert lags == [0, 1, 2, 2, 2, 2]
        acc = await svc.accounting()
        assert acc["fixed_lag_short_groups"] == 0 and acc["identity_holds"]

    asyncio.run(scenario())


def test_fixed_lag_trains_a_younger_group_rather_than_stall_when_a_drop_left_a_hole():
    # k = 1, B = 2 (one group of two), eta = 1: version 0 admits a and b. a is trained at version 0; b
    # fails after the publish of version 1, so its slot is refilled at version 1 (c, d). Version 1 wants a
    # group started at version 0 and none is left or still generating: it trains the oldest one instead
    # (c, lag 0), counted, rather than waiting forever.
    async def scenario():
        svc = StalenessService(batch_size=2, max_staleness=1, max_running=None, num_prompts=50, seed=0, fixed_lag=1)
        a, b = await svc.acquire(2, "w0"), await svc.acquire(2, "w0")
        await svc.put(_group(a, 2))
        assert (await svc.get_batch(2))[0].group_id == str(a["seq"])
        await svc.set_version(1)
        await svc.drop(b["seq"], "error")
        c, d = await svc.acquire(2, "w0"), await svc.acquire(2, "w0")  # (1 + 1 + 1) * 2 = 6: two groups more
        await svc.put(_group(c, 2))
        await svc.put(_group(d, 2))
        batch = await asyncio.wait_for(svc.get_batch(2), timeout=5)
        assert batch[0].group_id == str(c["seq"]) and batch[0].start_version == 1
        acc = await svc.accounting()
        assert acc["fixed_lag_short_groups"] == 1 and acc["identity_holds"]

    asyncio.run(scenario())


def test_a_live_service_rolls_back_to_its_checkpoint_for_a_restarted_trainer():
    """In-run trainer recovery: halt ends the waiting admissions, restore in the same (live) service
    forgets what was admitted, buffered and consumed after the snapshot, and the re-issued tickets'
    trajectories can be consumed again (same ids, new content) while older ones still cannot."""
    async def scenario():
        svc = StalenessService(batch_size=4, max_staleness=1, max_running=None, num_prompts=10, seed=1)
        first = [await svc.acquire(2, "w0") for _ in range(2)]
        for t in first:
            await svc.put(_group(t, 2))
        await svc.get_batch(4)  # step 1: groups 0 and 1
        await svc.pause()
        await svc.set_version(1)
        snap = await svc.snapshot()  # the checkpoint after step 1
        await svc.resume()
        later = [await svc.acquire(2, "w0") for _ in range(4)]  # (i + eta + 1) * B = 12: 8 more admitted
        for t in later[:2]:
            await svc.put(_group(t, 2))
        await svc.get_batch(4)  # step 2, lost with the trainer
        await svc.put(_group(later[2], 2))  # buffered when the trainer died; later[3] still running

        waiting = asyncio.ensure_future(svc.acquire(2, "w0"))  # a loop waiting for admission (the pipeline is full)
        await asyncio.sleep(0)
        await svc.pause()
        await svc.halt()
        assert await waiting is None  # the loop ends instead of waiting forever
        await svc.drop(later[3]["seq"], "shutdown")  # the aborted in-flight group
        await svc.restore(snap)
        acc = await svc.accounting()
        assert acc["identity_holds"] and acc["consumed"] == 4 and acc["buffered"] == 0 and acc["in_flight"] == 0
        await svc.resume()
        again = [await svc.acquire(2, "w0") for _ in range(2)]
        assert [t["seq"] for t in again] == [t["seq"] for t in later[:2]]  # the same tickets, issued again
        assert [t["prompt_index"] for t in again] == [t["prompt_index"] for t in later[:2]]
        for t in again:
            await svc.put(_group(t, 2))
        assert len(await svc.get_batch(4)) == 4  # their ids were consumed before the rollback: allowed again
        assert (await svc.accounting())["consumed"] == 8

    asyncio.run(scenario())
