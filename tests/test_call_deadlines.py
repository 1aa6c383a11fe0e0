"""CallDeadlines (stage_server/call_deadlines.py): asyncio.timeout's outcome for the stage's expert
calls with one timer for all of them, and a lent call to a server that never answers fails over
within its deadline."""

import asyncio
import time

import pytest

from stage_server.call_deadlines import CallDeadlines


async def bounded(deadlines: CallDeadlines, timeout: float, work):
    """work() under the deadline, written as RemoteExperts._call writes it."""
    with deadlines.bound(timeout):
        return await work()


def test_a_call_past_its_deadline_raises_timeout_and_what_it_awaited_was_cancelled():
    async def main():
        deadlines, seen = CallDeadlines(), []

        async def hangs():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append("cancelled")  # (as ShmCall.invoke marks its session broken)
                raise

        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await bounded(deadlines, 0.05, hangs)
        elapsed = time.monotonic() - started
        task = asyncio.current_task()
        await asyncio.sleep(0)  # the task is not left cancelling: it goes on awaiting
        return seen, elapsed, task.cancelling(), deadlines._deadlines, deadlines._expired

    seen, elapsed, cancelling, left, expired = asyncio.run(main())
    assert seen == ["cancelled"] and 0.05 <= elapsed < 5 and cancelling == 0 and not left and not expired


def test_calls_within_their_deadlines_share_one_timer_and_a_sooner_one_rearms_it():
    async def main():
        deadlines = CallDeadlines()

        async def quick():
            await asyncio.sleep(0)
            return 7

        answers = [await bounded(deadlines, 5.0, quick) for _ in range(3)]
        first = deadlines._timer
        answers += [await bounded(deadlines, 5.0, quick) for _ in range(3)]
        kept = deadlines._timer is first  # later deadlines: the armed timer (sooner) stays
        started = time.monotonic()
        with pytest.raises(TimeoutError):  # a sooner deadline than the armed timer's is kept all the same
            await bounded(deadlines, 0.05, lambda: asyncio.sleep(30))
        elapsed = time.monotonic() - started
        deadlines.close()
        return answers, first is not None, kept, elapsed

    answers, armed, kept, elapsed = asyncio.run(main())
    assert answers == [7] * 6 and armed and kept and elapsed < 4


def test_another_cancellation_stays_a_cancellation():
    async def main():
        deadlines = CallDeadlines()
        task = asyncio.create_task(bounded(deadlines, 5.0, lambda: asyncio.sleep(30)))
        await asyncio.sleep(0.01)
        task.cancel()  # (the step's own cancellation, not the deadline)
        with pytest.raises(asyncio.CancelledError):
            await task
        deadlines.close()
        return deadlines._deadlines

    assert asyncio.run(main()) == {}


def test_a_timer_armed_on_a_closed_loop_does_not_bound_a_call_on_a_new_one():
    deadlines = CallDeadlines()

    async def quick():
        return await bounded(deadlines, 0.1, lambda: asyncio.sleep(0))

    asyncio.run(quick())  # arms a timer on that loop (sooner than the next call's deadline), which then closes

    async def hangs():
        with pytest.raises(TimeoutError):
            await bounded(deadlines, 0.5, lambda: asyncio.sleep(30))

    asyncio.run(asyncio.wait_for(hangs(), 10))


def test_a_lent_call_to_a_silent_server_fails_over_within_its_deadline(mixtral_dir, monkeypatch):
    from shardmesh.models.packed_rows import PackedRows
    from shardmesh.service_config import ServiceConfig
    from shardmesh.shm_plane import ShmCall
    from expert_server.main import start_expert_server
    from stage_server.remote_experts import Placement, RemoteExperts
    import torch

    invoke, silenced = ShmCall.invoke, []

    async def silent_once(self, *args):
        if not silenced:
            silenced.append(self.channel)
            try:
                await asyncio.sleep(30)  # (a frozen server: no reply)
            except asyncio.CancelledError:
                self.channel.broken = True  # as invoke leaves a session cut mid-call
                raise
        return await invoke(self, *args)

    async def main():
        server = await start_expert_server(ServiceConfig(model_dir=mixtral_dir, name="experts-a", data_plane="shm"))
        experts = RemoteExperts(data_plane="shm")
        experts.deadline = lambda rows: 0.3
        try:
            await experts.update(Placement(1, {(0, e): (server.address,) for e in range(5)}))
            data = torch.randn(7, 64, generator=torch.Generator().manual_seed(8))  # [7, H]
            expected = await experts.run(0, PackedRows(data, (0, 2, 4), (3, 1, 3)))
            monkeypatch.setattr(ShmCall, "invoke", silent_once)
            started = time.monotonic()
            async with experts.lend(0) as lent:
                rows = lent.rows(7, 64, torch.float32)
                rows.copy_(data)
                outputs = await lent.run(PackedRows(rows, (0, 2, 4), (3, 1, 3)))
                same = all(torch.equal(outputs[e], expected[e]) for e in (0, 2, 4))
            return same, experts.failovers, len(silenced), time.monotonic() - started
        finally:
            await experts.close()
            await server.stop(grace=None)

    same, failovers, silenced_calls, elapsed = asyncio.run(asyncio.wait_for(main(), 60))
    assert same and failovers == 3 and silenced_calls == 1 and 0.3 <= elapsed < 10
