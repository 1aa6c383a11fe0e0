"""The scheduler's batched greedy argmax: each greedy row gets its own row's first maximum, and
sampled rows in the same batch draw exactly what their own Sampler draws from their row."""

import asyncio

import torch

from shardmesh.sampling import Sampler, SamplingParams
from shardmesh.scheduler import Scheduler, Sequence

VOCAB = 64


def row_logits(sequence_id: int, position: int) -> torch.Tensor:
    """[V] logits of one sequence at one position: seeded, with the maximum tied at two indices."""
    generator = torch.Generator().manual_seed(sequence_id * 1000 + position)
    row = torch.randn(VOCAB, generator=generator)
    top = torch.randperm(VOCAB, generator=generator)[:2].sort().values  # the tie: the lower index wins
    row[top] = row.max() + 1.0
    return row


class RowPipeline:
    """Each slice's row: row_logits(its sequence, its last position)."""

    async def step(self, slices, token_ids, greedy=False):
        await asyncio.sleep(0)
        return torch.stack([row_logits(s.sequence_id, s.start_position + s.num_tokens - 1) for s in slices])  # [B, V]

    async def free(self, sequence_ids):
        pass


def test_greedy_rows_and_sampled_rows_in_one_batch():
    params = {1: SamplingParams(), 2: SamplingParams(temperature=0.8, seed=7), 3: SamplingParams(),
              4: SamplingParams(temperature=1.3, top_k=5, seed=11)}
    prompts = {1: [5, 6, 7], 2: [9], 3: [1, 2], 4: [3, 3, 3, 3]}
    new_tokens = 6

    async def main():
        scheduler = Scheduler(RowPipeline())
        scheduler.start()
        sequences = {i: Sequence(i, prompts[i], new_tokens, frozenset(), Sampler(p)) for i, p in params.items()}
        for seq in sequences.values():
            scheduler.submit(seq)
        events = {}
        for i, seq in sequences.items():
            events[i] = [await seq.events.get() for _ in range(new_tokens)]
        await scheduler.stop()
        return events

    events = asyncio.run(asyncio.wait_for(main(), 10))
    for i, p in params.items():
        own = Sampler(p)  # the same seed: what this sequence alone would draw
        expected = []
        for k in range(new_tokens):
            row = row_logits(i, len(prompts[i]) - 1 + k)
            expected.append(int(torch.nonzero(row == row.max())[0]) if p.temperature == 0 else own(row))
        assert [e.token_id for e in events[i]] == expected, i


def test_greedy_token_ids_is_torch_argmax():
    """The numpy fast path (fp32, CPU) picks what torch.argmax picks: ties to the first maximum,
    NaN rows to their first NaN, non-contiguous rows; other dtypes go through torch."""
    from shardmesh.sampling import greedy_token_ids

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 1000, generator=generator)                # [B, V]
    logits[1, [7, 500]] = logits[1].max() + 2.0                        # a tie: 7 wins
    logits[2, [40, 30]] = float("nan")                                 # NaN: the first one, 30
    logits[3, :] = -float("inf")
    logits[3, 999] = 0.0
    logits[4, :] = 1.5                                                 # all tied: 0
    for case in (logits, logits[:, ::2], logits.to(torch.bfloat16), logits.double()):
        assert greedy_token_ids(case) == case.argmax(dim=-1).tolist()
    assert greedy_token_ids(logits)[1:5] == [7, 30, 999, 0]
