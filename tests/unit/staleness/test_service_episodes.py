"""The staleness service counts consumed episodes (multi-turn rollouts) for accounting.json."""

import asyncio

from rollout.trajectory import Trajectory
from staleness.service import StalenessService
from tests.helpers import ticket_group as _group


def test_consumed_episodes_are_counted_and_survive_a_restore():
    def episode(ticket, k):
        # model turn (3 tokens), tool output (2), model turn (1)
        return Trajectory(f"{ticket['seq']}-{k}", ticket["prompt_index"], str(ticket["seq"]), [1], [2] * 6, [0.0] * 6,
                          [0] * 6, ticket["version"], loss_mask=[1, 1, 1, 0, 0, 1],
                          info={"turns": 2, "tool_calls": 1, "tool_errors": k})

    async def scenario():
        svc = StalenessService(batch_size=2, max_staleness=1, max_running=None, num_prompts=10, seed=0)
        ticket = await svc.acquire(2, "w0")
        await svc.put([episode(ticket, 0), episode(ticket, 1)])
        await svc.get_batch(2)
        expected = {"consumed": 2, "turns": 4, "tool_calls": 2, "tool_errors": 1, "model_tokens": 8, "env_tokens": 4}
        assert (await svc.accounting())["episodes"] == expected
        await svc.pause()
        fresh = StalenessService(batch_size=2, max_staleness=1, max_running=None, num_prompts=10, seed=0)
        await fresh.restore(await svc.snapshot())
        assert (await fresh.accounting())["episodes"] == expected
        # single-turn runs have no episodes entry
        plain = StalenessService(batch_size=2, max_staleness=1, max_running=None, num_prompts=10, seed=0)
        t = await plain.acquire(2, "w0")
        await plain.put(_group(t, 2))
        await plain.get_batch(2)
        assert "episodes" not in await plain.accounting()

    asyncio.run(scenario())
