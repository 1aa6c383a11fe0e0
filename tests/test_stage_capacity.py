"""A stage's KV capacity (`--max-cached-sequences`): a step that would start one sequence more than
the cache may hold is refused with RESOURCE_EXHAUSTED naming that sequence, changes nothing, and a
step of cached sequences goes on; once one is freed a new one fits. Also through the command line."""

import asyncio

import pytest
import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.errors import ResourceExhausted
from shardmesh.serve import add_service_arguments
from shardmesh.stage_model import StageBatch, StageModel


def step(stage: StageModel, sequence_ids, start_positions, num_tokens):
    token_ids = torch.arange(1, 1 + sum(num_tokens), dtype=torch.long)  # [N]
    return asyncio.run(stage.forward(StageBatch(list(sequence_ids), list(start_positions), list(num_tokens),
                                                token_ids), None))


def test_a_new_sequence_past_the_capacity_is_refused(llama_dir):
    config = ModelConfig.from_dir(llama_dir)
    stage = StageModel(config, 0, config.num_layers, CheckpointReader(llama_dir))
    stage.max_cached_sequences = 2
    step(stage, [1, 2], [0, 0], [3, 2])
    with pytest.raises(ResourceExhausted) as refused:
        step(stage, [1, 3], [3, 0], [1, 2])  # one cached, one new: the new one does not fit
    assert refused.value.field == "sequences[1].sequence_id", refused.value
    assert "--max-cached-sequences" in refused.value.message
    assert stage.cached_sequence_ids() == [1, 2] and stage.cached_length(1) == 3  # nothing changed
    step(stage, [1, 2], [3, 2], [1, 1])  # cached sequences go on
    stage.free([2])
    step(stage, [1, 3], [4, 0], [1, 2])  # room again
    assert stage.cached_sequence_ids() == [1, 3]


def test_the_stage_command_line_takes_the_capacity():
    import argparse
    parser = argparse.ArgumentParser()
    add_service_arguments(parser, "stage")
    args = parser.parse_args(["--model", "m", "--name", "s0", "--router", "r:1", "--max-cached-sequences", "8"])
    assert args.max_cached_sequences == 8
