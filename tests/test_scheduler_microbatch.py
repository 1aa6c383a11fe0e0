"""Micro-batches in flight and chunked prefill, on a fake pipeline (see test_scheduler.py)."""

import asyncio

import pytest
import torch

from shardmesh.scheduler import Scheduler
from test_scheduler import VOCAB, collect, run, sequence


class SlowPipeline:
    """Next token = (last input token + 1) % VOCAB; each step takes a few loop turns, so lanes overlap."""

    def __init__(self):
        self.steps: list[list[tuple[int, int, int]]] = []
        self.in_flight = self.most_in_flight = 0
        self.freed: list[int] = []

    async def step(self, slices, token_ids, greedy=False):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.steps.append([(s.sequence_id, s.start_position, s.num_tokens) for s in slices])
        for _ in range(3):
            await asyncio.sleep(0)
        self.in_flight -= 1
        ends = torch.cumsum(torch.tensor([s.num_tokens for s in slices]), 0) - 1
        return torch.nn.functional.one_hot((token_ids[ends] + 1) % VOCAB, VOCAB).float()  # [B, V]

    async def free(self, sequence_ids):
        self.freed.extend(sequence_ids)


def test_micro_batches_step_concurrently_on_disjoint_sequences():
    async def main():
        pipeline = SlowPipeline()
        scheduler = Scheduler(pipeline, micro_batches=2)
        scheduler.start()
        sequences = [sequence(i + 1, [i], 6) for i in range(4)]
        for s in sequences:
            scheduler.submit(s)
        events = await asyncio.gather(*(collect(s) for s in sequences))
        await scheduler.stop()
        return pipeline, events

    pipeline, events = run(main())
    for i, seq_events in enumerate(events):
        assert [e.token_id for e in seq_events] == [(i + k) % VOCAB for k in range(1, 7)]
    assert pipeline.most_in_flight == 2
    lanes = {frozenset(sid for sid, _, _ in step) for step in pipeline.steps}
    assert len(lanes) == 2 and all(len(lane) == 2 for lane in lanes), lanes  # two lanes of two, never mixed
    assert sorted(pipeline.freed) == [1, 2, 3, 4]


def test_long_prompt_is_prefilled_in_chunks_while_others_decode():
    async def main():
        pipeline = SlowPipeline()
        scheduler = Scheduler(pipeline, prefill_chunk_tokens=4)
        scheduler.start()
        a = sequence(1, [3], 8)
        scheduler.submit(a)
        await a.events.get()
        b = sequence(2, list(range(10)), 2)  # 10 prompt tokens: chunks of 4, 4, 2
        scheduler.submit(b)
        events_a, events_b = await asyncio.gather(collect(a), collect(b))
        await scheduler.stop()
        return pipeline, events_a, events_b

    pipeline, events_a, events_b = run(main())
    assert [e.token_id for e in events_b] == [10, 11]
    assert [e.token_id for e in events_a] == list(range(5, 12))
    with_b = [step for step in pipeline.steps if any(sid == 2 for sid, _, _ in step)]
    assert [next(s for s in step if s[0] == 2) for step in with_b[:3]] == [(2, 0, 4), (2, 4, 4), (2, 8, 2)]
    assert all(any(sid == 1 for sid, _, _ in step) for step in with_b[:3]), "a stalled while b prefilled"


def test_prompt_tokens_per_step_stay_within_the_chunk_budget():
    async def main():
        pipeline = SlowPipeline()
        scheduler = Scheduler(pipeline, prefill_chunk_tokens=5)
        scheduler.start()
        prompts = [sequence(1, list(range(7)), 1), sequence(2, list(range(6)), 1), sequence(3, [1], 3)]
        for s in prompts:
            scheduler.submit(s)
        await asyncio.gather(*(collect(s) for s in prompts))
        await scheduler.stop()
        return pipeline

    pipeline = run(main())
    prompt_lengths = {1: 7, 2: 6, 3: 1}
    for step in pipeline.steps:  # a slice starting inside its prompt is prefill
        assert sum(n for sid, start, n in step if start < prompt_lengths[sid]) <= 5, step
    for sid, length in prompt_lengths.items():
        assert sum(n for step in pipeline.steps for s, start, n in step if s == sid and start < length) == length


def test_a_full_batch_leaves_idle_lanes_waiting_not_spinning():
    async def main():
        pipeline = SlowPipeline()
        scheduler = Scheduler(pipeline, max_batch_sequences=1, micro_batches=2)
        scheduler.start()
        first, second = sequence(1, [0], 3), sequence(2, [5], 2)
        scheduler.submit(first)
        scheduler.submit(second)  # no room until `first` finishes
        ticks = 0

        async def ticker():  # would starve if an idle lane spun without awaiting
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.get_running_loop().create_task(ticker())
        events = await asyncio.gather(collect(first), collect(second))
        task.cancel()
        await scheduler.stop()
        return pipeline, events, ticks

    pipeline, events, ticks = run(main())
    assert [e.token_id for e in events[1]] == [6, 7]
    assert all(len(step) == 1 for step in pipeline.steps)
    assert ticks > 0


@pytest.mark.parametrize("kwargs", [dict(micro_batches=0), dict(prefill_chunk_tokens=-1), dict(max_batch_sequences=0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Scheduler(SlowPipeline(), **kwargs)
