"""A last stage asked for greedy tokens (StageBatch.greedy, from StepRequest.greedy_token_ids) takes
the greedy head where it runs (kernels.calls counts it) and answers GreedyTokens equal to the
argmax of the logits the same stage gives when asked for logits, step after step of a decode, at
batches 1-16 and over 16 (the full head there); the mesh's transformers oracle is
test_greedy_token_ids.py / test_mesh_oracle.py."""

import asyncio

import torch

from shardmesh import kernels
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard, LocalExperts
from shardmesh.sampling import GreedyTokens, greedy_token_ids
from shardmesh.stage_model import StageBatch, StageModel


def whole_model(model_dir) -> tuple[StageModel, LocalExperts]:
    config = ModelConfig.from_dir(model_dir)
    experts = LocalExperts([ExpertShard(config, [(layer, e) for layer in range(config.num_layers)
                                                 for e in range(config.num_experts)], CheckpointReader(model_dir))])
    return StageModel(config, 0, config.num_layers, CheckpointReader(model_dir)), experts


def test_greedy_steps_take_the_greedy_head_and_match_the_logits(mixtral_dir, two_compute_threads):
    greedy_stage, experts = whole_model(mixtral_dir)
    logits_stage, _ = whole_model(mixtral_dir)
    vocab = greedy_stage.config.vocab_size

    async def decode(batch_size: int, steps: int) -> None:
        ids = list(range(1000 * batch_size, 1000 * batch_size + batch_size))
        generator = torch.Generator().manual_seed(batch_size)
        prompts = torch.randint(3, vocab, (batch_size, 5), generator=generator)
        inputs, starts, counts = prompts.flatten(), [0] * batch_size, [5] * batch_size
        for step in range(steps):
            before = kernels.calls["greedy_head"]
            got = await greedy_stage.forward(StageBatch(ids, starts, counts, inputs, greedy=True), experts)
            logits = await logits_stage.forward(StageBatch(ids, starts, counts, inputs), experts)
            assert isinstance(logits, torch.Tensor) and logits.shape == (batch_size, vocab)
            want = greedy_token_ids(logits)
            if greedy_stage.greedy_head is not None and batch_size <= 16:
                assert isinstance(got, GreedyTokens) and kernels.calls["greedy_head"] == before + 1
                assert got.token_ids == want, (batch_size, step)
            else:  # no AMX here, or over 16 rows: the full head's logits, as before
                assert kernels.calls["greedy_head"] == before and torch.equal(got, logits)
            starts = [start + count for start, count in zip(starts, counts)]
            counts, inputs = [1] * batch_size, torch.tensor(want)

    for batch_size in (1, 3, 16, 17):
        asyncio.run(decode(batch_size, 4))
