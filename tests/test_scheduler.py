"""Continuous batching on a fake pipeline: joining, leaving, cancelling, failing."""

import asyncio

import torch

from shardmesh.errors import Unavailable
from shardmesh.sampling import Sampler, SamplingParams
from shardmesh.scheduler import Scheduler, Sequence, TokenEvent

VOCAB = 16


class FakePipeline:
    """Next token = (last input token + 1) % VOCAB, as greedy logits; records every step."""

    def __init__(self):
        self.steps: list[list[tuple[int, int, int]]] = []
        self.freed: list[int] = []
        self.fail_next = False

    async def step(self, slices, token_ids, greedy=False):
        # Two turns of the event loop (a stage takes many): the scheduler hands a step's tokens to the
        # streams once the next step is sent, and the clients here react to them within that step.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next = False
            raise Unavailable("stage", "stage-0 is gone")
        self.steps.append([(s.sequence_id, s.start_position, s.num_tokens) for s in slices])
        ends = torch.cumsum(torch.tensor([s.num_tokens for s in slices]), 0) - 1
        last = token_ids[ends]                                  # [B]
        return torch.nn.functional.one_hot((last + 1) % VOCAB, VOCAB).float()  # [B, V]

    async def free(self, sequence_ids):
        self.freed.extend(sequence_ids)


def sequence(sequence_id, prompt, max_new_tokens, stop=()):
    return Sequence(sequence_id, prompt, max_new_tokens, frozenset(stop), Sampler(SamplingParams()))


async def collect(seq: Sequence) -> list:
    events = []
    while True:
        event = await seq.events.get()
        events.append(event)
        if isinstance(event, Exception) or event.finish_reason:
            return events


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_requests_join_and_leave_the_running_batch():
    async def main():
        pipeline = FakePipeline()
        scheduler = Scheduler(pipeline)
        scheduler.start()
        a = sequence(1, [3, 4], 5)
        scheduler.submit(a)
        first = await a.events.get()
        b = sequence(2, [9], 2)          # arrives while `a` decodes
        scheduler.submit(b)
        events_a, events_b = await asyncio.gather(collect(a), collect(b))
        await scheduler.stop()
        return pipeline, [first] + events_a, events_b

    pipeline, events_a, events_b = run(main())
    assert [e.token_id for e in events_a] == [5, 6, 7, 8, 9]
    assert [e.finish_reason for e in events_a] == [None] * 4 + ["length"]
    assert [e.token_id for e in events_b] == [10, 11]
    # b's prefill joined a decode step of a; both then decoded together; b left, a went on.
    joined = [step for step in pipeline.steps if len(step) == 2]
    assert joined and joined[0][1] == (2, 0, 1) and joined[0][0][2] == 1
    slices_a = [s for step in pipeline.steps for s in step if s[0] == 1]
    assert slices_a == [(1, 0, 2), (1, 2, 1), (1, 3, 1), (1, 4, 1), (1, 5, 1)]
    assert pipeline.steps[-1] == [(1, 5, 1)]
    assert sorted(pipeline.freed) == [1, 2]


def test_stop_token_ends_with_stop():
    async def main():
        scheduler = Scheduler(FakePipeline())
        scheduler.start()
        seq = sequence(1, [1], 10, stop=[4])
        scheduler.submit(seq)
        events = await collect(seq)
        await scheduler.stop()
        return events

    events = run(main())
    assert [e.token_id for e in events] == [2, 3, 4]
    assert events[-1].finish_reason == "stop"


def test_cancelled_sequence_leaves_and_is_freed():
    async def main():
        pipeline = FakePipeline()
        scheduler = Scheduler(pipeline)
        scheduler.start()
        a, b = sequence(1, [0], 50), sequence(2, [0], 4)
        scheduler.submit(a)
        scheduler.submit(b)
        await a.events.get()
        scheduler.cancel(a)
        events_b = await collect(b)
        for _ in range(100):  # bounded: a's KV is freed at the next step boundary
            if 1 in pipeline.freed:
                break
            await asyncio.sleep(0)
        await scheduler.stop()
        return pipeline, events_b

    pipeline, events_b = run(main())
    assert [e.token_id for e in events_b] == [1, 2, 3, 4]
    assert 1 in pipeline.freed
    assert all(len(step) == 1 for step in pipeline.steps[2:])


def test_failed_step_ends_its_sequences_and_the_scheduler_goes_on():
    async def main():
        pipeline = FakePipeline()
        scheduler = Scheduler(pipeline)
        scheduler.start()
        pipeline.fail_next = True
        a = sequence(1, [0], 3)
        scheduler.submit(a)
        events_a = await collect(a)
        b = sequence(2, [5], 2)
        scheduler.submit(b)
        events_b = await collect(b)
        await scheduler.stop()
        return pipeline, events_a, events_b

    pipeline, events_a, events_b = run(main())
    assert isinstance(events_a[-1], Unavailable)
    assert 1 in pipeline.freed
    assert [e.token_id for e in events_b if isinstance(e, TokenEvent)] == [6, 7]
