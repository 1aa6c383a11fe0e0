"""A stage's per-step bookkeeping, made cheap for the decode loop (issue 5), still says what it did:
SequenceHistory (GetStageInfo.sequence_history) counts every step and free, and a step validated by
tp_step is not validated again by StageModel.forward (validated=True) while forward alone still is."""

import asyncio

import pytest
import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.errors import InvalidArgument
from shardmesh.stage_model import StageBatch, StageModel

from stage_server.sequence_history import SequenceHistory


def step(*pieces: tuple[int, int, int]) -> tuple[list[int], list[int], list[int]]:
    """(sequence id, start position, num_tokens) per sequence -> a StageBatch's three lists."""
    return tuple(list(column) for column in zip(*pieces))


def test_sequence_history_counts_steps_and_frees():
    history = SequenceHistory(limit=2)
    history.stepped(*step((7, 0, 5), (8, 0, 2)))
    history.stepped(*step((7, 5, 1)))
    history.freed([7, 99])
    history.stepped(*step((8, 2, 1)))  # 8 is now the most recent: 7 goes first when a third comes
    assert [(h.sequence_id, h.first_start_position, h.first_num_tokens, h.tokens_received, h.steps, h.frees)
            for h in history.messages()] == [(7, 0, 5, 6, 2, 1), (8, 0, 2, 3, 2, 0)]
    history.stepped(*step((9, 4, 1)))
    assert [h.sequence_id for h in history.messages()] == [8, 9]


class NoExperts:
    async def run(self, layer, groups):
        raise AssertionError("not reached")


def test_forward_validates_unless_told_it_was(llama_dir):
    model = StageModel(ModelConfig.from_dir(llama_dir), 0, 1, CheckpointReader(llama_dir))
    twice = StageBatch([3, 3], [0, 0], [1, 1], torch.tensor([1, 2]))  # a sequence twice: refused by validate
    with pytest.raises(InvalidArgument, match="appears twice"):
        asyncio.run(model.forward(twice, NoExperts()))
    calls = []
    model.validate = lambda batch: calls.append(batch)
    good = StageBatch([4], [0], [2], torch.tensor([1, 2]))
    asyncio.run(model.forward(good, NoExperts(), validated=True))
    assert calls == []
    asyncio.run(model.forward(StageBatch([5], [0], [1], torch.tensor([3])), NoExperts()))
    assert len(calls) == 1
