"""Replay after a stage is replaced (shardmesh.scheduler): on a fake pipeline that keeps a KV cache
as real stages do (a step must start at the cached length) and whose next token depends on every
cached token, so a replay that loses, repeats or misplaces a token changes the output."""

import asyncio

import pytest
import torch

from shardmesh.errors import FailedPrecondition, Unavailable
from shardmesh.sampling import Sampler, SamplingParams
from shardmesh.scheduler import MAX_REPLAYS, KVLost, Scheduler, Sequence

VOCAB = 31


class KVPipeline:
    """Next token = (sum of the sequence's cached tokens + its length) % VOCAB. `lose_at` step
    numbers replace the stage during that step: caches emptied, epoch + 1, KVLost raised. With
    `keep_partial`, the stage failed but lives (router/failover.py: replayed on it): the caches stay,
    and the stages before it already hold the failed step's tokens."""

    def __init__(self, lose_at=(), keep_partial=False):
        self.keep_partial = keep_partial
        self.epoch = 0
        self.cache: dict[int, list[int]] = {}
        self.steps = 0
        self.lose_at = set(lose_at)
        self.received: list[tuple[int, int, int, int]] = []  # (epoch, sequence_id, start, num_tokens)
        self.frees: list[tuple[int, list[int]]] = []  # (steps taken before, sequence ids)

    async def step(self, slices, token_ids, greedy=False):
        epoch = self.epoch
        await asyncio.sleep(0)  # another lane's step may replace the stage meanwhile
        if self.epoch != epoch:
            raise KVLost("stage replaced during this step")
        self.steps += 1
        if self.steps in self.lose_at:
            if self.keep_partial:  # the first stage took the step before a later one failed it
                offset = 0
                for piece in slices:
                    self.cache.setdefault(piece.sequence_id, []).extend(token_ids[offset:offset + piece.num_tokens].tolist())
                    offset += piece.num_tokens
            else:
                self.cache.clear()
            self.epoch += 1
            raise KVLost("stage replaced")
        rows, offset = [], 0
        for piece in slices:
            cached = self.cache.setdefault(piece.sequence_id, [])
            if piece.start_position != len(cached):
                raise FailedPrecondition("start_position", f"{piece.start_position} != {len(cached)} cached")
            cached.extend(token_ids[offset:offset + piece.num_tokens].tolist())
            offset += piece.num_tokens
            self.received.append((self.epoch, piece.sequence_id, piece.start_position, piece.num_tokens))
            rows.append((sum(cached) + len(cached)) % VOCAB)
        return torch.nn.functional.one_hot(torch.tensor(rows), VOCAB).float()  # [B, V]

    async def free(self, sequence_ids):
        self.frees.append((self.steps, sorted(sequence_ids)))
        for sequence_id in sequence_ids:
            self.cache.pop(sequence_id, None)


PROMPTS = {1: [3, 4, 5], 2: [7, 1], 3: [2, 2, 2, 9], 4: [6]}


async def generate(pipeline, new_tokens: int = 8, **scheduler_args) -> dict[int, list]:
    scheduler = Scheduler(pipeline, **scheduler_args)
    sequences = [Sequence(i, prompt, new_tokens, frozenset(), Sampler(SamplingParams())) for i, prompt in PROMPTS.items()]
    scheduler.start()
    try:
        for sequence in sequences:
            scheduler.submit(sequence)
        results = {}
        for sequence in sequences:
            events = []
            while not events or not (isinstance(events[-1], Exception) or events[-1].finish_reason):
                events.append(await sequence.events.get())
            results[sequence.sequence_id] = [e if isinstance(e, Exception) else e.token_id for e in events]
        return results
    finally:
        await scheduler.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


@pytest.mark.parametrize("scheduler_args", [{}, {"micro_batches": 2}, {"prefill_chunk_tokens": 3},
                                            {"micro_batches": 2, "prefill_chunk_tokens": 2}])
def test_replay_after_a_lost_stage_gives_the_same_tokens(scheduler_args):
    expected = run(generate(KVPipeline(), **scheduler_args))
    pipeline = KVPipeline(lose_at={4, 9})
    assert run(generate(pipeline, **scheduler_args)) == expected
    # After each replacement every sequence still running was sent its whole context once, from 0:
    # what an epoch received covers each position of a sequence exactly once.
    for epoch in (1, 2):
        for sequence_id in PROMPTS:
            pieces = [(start, n) for e, i, start, n in pipeline.received if e == epoch and i == sequence_id]
            positions = [p for start, n in pieces for p in range(start, start + n)]
            assert positions == list(range(len(positions))), (epoch, sequence_id, pieces)


@pytest.mark.parametrize("lose_at", [{1}, {2}, {5}])
def test_a_step_lost_on_a_later_stage_is_replayed_over_what_the_earlier_stages_kept(lose_at):
    """The step that failed may have reached the stages before the failing one (their caches hold
    it), also a sequence's first step (its prefill: nothing fed yet, as far as the router knows):
    the replay frees it everywhere first (CI saw a replayed prefill refused: 'start_position: 0 but
    sequence 4 has 2 tokens cached')."""
    expected = run(generate(KVPipeline()))
    assert run(generate(KVPipeline(lose_at=lose_at, keep_partial=True))) == expected


def test_sequences_that_join_after_a_replacement_are_not_freed_before_their_first_step():
    pipeline = KVPipeline()
    pipeline.epoch = 3  # stages were replaced before these requests came
    run(generate(pipeline, new_tokens=2))
    assert pipeline.frees and all(steps > 0 for steps, _ in pipeline.frees), pipeline.frees


def test_replay_carries_prompt_and_generated_tokens_in_one_prefill():
    pipeline = KVPipeline(lose_at={5})
    run(generate(pipeline))
    first = {}
    for epoch, sequence_id, start, num_tokens in pipeline.received:
        if epoch == 1:
            first.setdefault(sequence_id, (start, num_tokens))
    # Steps 1-4 were the prompts' prefill and 3 decode steps: 4 tokens generated, the last one not
    # fed yet; the replay feeds the prompt and all 4, and samples the 5th from its logits.
    assert first == {i: (0, len(prompt) + 4) for i, prompt in PROMPTS.items()}


def test_a_sequence_that_keeps_losing_its_kv_fails_unavailable():
    pipeline = KVPipeline(lose_at=set(range(2, 40)))
    results = run(generate(pipeline))
    for events in results.values():
        assert isinstance(events[-1], Unavailable), events
        assert f"{MAX_REPLAYS + 1} steps in a row lost the KV" in str(events[-1])
