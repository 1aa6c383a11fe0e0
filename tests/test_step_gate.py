"""StepGate and read_ahead (stage_server/step_gate.py) on their own: steps of disjoint sequences
run at once, a shared sequence's steps one at a time in arrival order, exclusive() alone, a
cancelled waiter never lets a later step overtake a running one; a stream's steps start before the
earlier ones answer while their results go out in request order."""

import asyncio
import contextlib
import contextvars

import pytest

from stage_server.step_gate import StepGate, read_ahead


class Trace:
    """Records when holders enter and leave; `hold` keeps one inside until released."""

    def __init__(self, gate: StepGate):
        self.gate, self.events, self.inside = gate, [], set()
        self.releases: dict[str, asyncio.Event] = {}
        self.overlaps: list[set[str]] = []

    async def hold(self, name: str, sequence_ids=None):
        release = self.releases.setdefault(name, asyncio.Event())
        holder = self.gate.exclusive() if sequence_ids is None else self.gate.sequences(sequence_ids)
        async with holder:
            self.events.append(f"+{name}")
            self.inside.add(name)
            self.overlaps.append(set(self.inside))
            await release.wait()
            self.inside.discard(name)
            self.events.append(f"-{name}")

    def release(self, name: str) -> None:
        self.releases.setdefault(name, asyncio.Event()).set()


async def settle():
    """Let every task that can run, run (a few loop turns per hop: read, wait, start)."""
    for _ in range(50):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_disjoint_sequences_run_at_once_and_a_shared_one_waits_in_order():
    async def main():
        trace = Trace(StepGate())
        a = asyncio.create_task(trace.hold("a", [1, 2]))
        b = asyncio.create_task(trace.hold("b", [3]))      # disjoint from a: runs beside it
        c = asyncio.create_task(trace.hold("c", [2, 3]))   # shares 2 with a and 3 with b: waits for both
        d = asyncio.create_task(trace.hold("d", [2]))      # after c (arrived later, shares 2)
        await settle()
        inside_first = set(trace.inside)
        trace.release("d")  # d may not jump ahead of c even though it is ready to leave
        trace.release("a")
        await settle()
        after_a = set(trace.inside)
        trace.release("b")
        await settle()
        after_b = set(trace.inside)
        trace.release("c")
        await asyncio.gather(a, b, c, d)
        return inside_first, after_a, after_b, trace.events

    inside_first, after_a, after_b, events = run(main())
    assert inside_first == {"a", "b"}
    assert after_a == {"b"}          # c still waits for b
    assert after_b == {"c"}          # d waits for c
    assert events.index("-c") < events.index("+d")


def test_exclusive_waits_for_earlier_holders_and_holds_back_later_ones():
    async def main():
        trace = Trace(StepGate())
        a = asyncio.create_task(trace.hold("a", [1]))
        x = asyncio.create_task(trace.hold("x"))          # exclusive
        b = asyncio.create_task(trace.hold("b", [2]))     # disjoint from a, but after x
        await settle()
        first = set(trace.inside)
        trace.release("a")
        await settle()
        second = set(trace.inside)
        trace.release("x")
        trace.release("b")
        await asyncio.gather(a, x, b)
        return first, second, trace.overlaps

    first, second, overlaps = run(main())
    assert first == {"a"} and second == {"x"}
    assert all(len(names) == 1 for names in overlaps if "x" in names)


def test_a_waiter_cancelled_does_not_let_a_later_step_overtake_a_running_one():
    async def main():
        trace = Trace(StepGate())
        a = asyncio.create_task(trace.hold("a", [1]))
        b = asyncio.create_task(trace.hold("b", [1]))     # waits for a
        c = asyncio.create_task(trace.hold("c", [1]))     # waits for b, hence for a
        await settle()
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        await settle()
        while_a_runs = set(trace.inside)
        trace.release("a")
        trace.release("c")
        await asyncio.gather(a, c)
        return while_a_runs, trace.events

    while_a_runs, events = run(main())
    assert while_a_runs == {"a"}
    assert events == ["+a", "-a", "+c", "-c"]


def test_waiters_cancelled_leave_nothing_behind_and_later_holders_still_wait_for_the_running_step():
    async def main():
        gate = StepGate()
        trace = Trace(gate)
        a = asyncio.create_task(trace.hold("a", [1, 2]))
        waiters = [asyncio.create_task(trace.hold("b", [2, 3])), asyncio.create_task(trace.hold("x"))]
        await settle()
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        c = asyncio.create_task(trace.hold("c", [2]))  # admitted after b's cancel: still after a
        await settle()
        while_a_runs = set(trace.inside), gate.busy
        trace.release("a")
        trace.release("c")
        await asyncio.gather(a, c)
        await settle()
        return while_a_runs, trace.events, (gate._tails, gate.busy, gate._barrier)

    while_a_runs, events, left = run(main())
    assert while_a_runs == ({"a"}, 2)  # a running, c waiting; the cancelled ones count no more
    assert events == ["+a", "-a", "+c", "-c"]
    assert left == ({}, 0, None)


def test_the_gate_forgets_sequences_once_their_steps_end():
    async def main():
        gate = StepGate()
        for round_ in range(3):
            async with gate.sequences([round_, 100]):
                pass
        async with gate.exclusive():
            pass
        return gate._tails, gate.busy, gate._barrier

    assert run(main()) == ({}, 0, None)


async def requests(values, arrived: asyncio.Event | None = None):
    for value in values:
        yield value
    if arrived is not None:
        arrived.set()


def test_read_ahead_starts_later_steps_early_and_answers_in_order():
    async def main():
        started, finish = [], {i: asyncio.Event() for i in range(4)}

        async def step(value):
            started.append(value)
            await finish[value].wait()
            return value * 10

        results = []
        all_read = asyncio.Event()
        async with contextlib.aclosing(read_ahead(requests(range(4), all_read), step, limit=3)) as steps:
            consumer = asyncio.create_task(_collect(steps, results))
            await settle()
            early = list(started)  # three started before any answered (the limit)
            finish[2].set()
            finish[1].set()
            await settle()
            before_first = list(results)  # 1 and 2 are done but wait behind 0
            finish[0].set()
            finish[3].set()
            await consumer
        return early, before_first, results

    early, before_first, results = run(main())
    assert early == [0, 1, 2]
    assert before_first == []
    assert results == [(0, 0), (1, 10), (2, 20), (3, 30)]


async def _collect(steps, results):
    async for request, task in steps:
        results.append((request, await task))


def test_closing_read_ahead_cancels_the_steps_not_yet_answered():
    async def main():
        cancelled, started = [], asyncio.Event()

        async def step(value):
            if value == 0:
                await started.wait()  # the others are running
                raise ValueError("step 0 failed")
            if value == 2:
                started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(value)
                raise

        async with contextlib.aclosing(read_ahead(requests(range(3)), step, limit=4)) as steps:
            async for _, task in steps:
                with pytest.raises(ValueError):
                    await task
                break  # the stream ends with its first error
        await settle()
        return cancelled

    assert run(main()) == [1, 2]


def test_read_ahead_starts_each_step_in_the_consumer_s_context_of_its_read():
    """The shared-memory plane sets the call being served (codec.inbound_call) around each request it
    feeds the stream: the step read then must run in that call's context, not the first one's."""
    call = contextvars.ContextVar("call")

    async def main():
        queue: asyncio.Queue = asyncio.Queue()

        async def fed():
            while (item := await queue.get()) is not None:
                yield item

        async def step(value):
            return call.get()

        seen = []
        async with contextlib.aclosing(read_ahead(fed(), step, limit=2)) as steps:
            for i in range(3):
                call.set(f"call {i}")
                queue.put_nowait(i)
                request, task = await anext(steps)
                seen.append((request, await task))
            queue.put_nowait(None)
            assert [item async for item in steps] == []  # the stream's end ends it
        return seen

    assert run(main()) == [(0, "call 0"), (1, "call 1"), (2, "call 2")]
