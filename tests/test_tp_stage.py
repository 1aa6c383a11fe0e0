"""TP shard servers' plumbing without the network: gloo groups formed with a deadline, and TP steps
run off the event loop, so that shards sharing one loop (the in-process mesh) neither deadlock nor
block it, and a missing peer is an error within the timeout, never a hang."""

import asyncio
import time

import pytest
import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.errors import Unavailable
from shardmesh.stage_model import StageBatch, StageModel
from shardmesh.tp_group import GlooGroup, TPJoinError
from shardmesh.tp_stage import forward_off_loop, join_group
from test_model_local import check_against_reference, every_layer, greedy_loop, load_experts, make_requests


class OneLoopTPStage:
    """T ranks of one stage driven from one event loop, as shard servers in one process would be."""

    def __init__(self, models: list[StageModel]):
        self.ranks = models

    async def forward(self, batch, experts):
        outputs = await asyncio.gather(*(forward_off_loop(m, batch, experts) for m in self.ranks))
        assert all(torch.equal(outputs[0], o) for o in outputs[1:])
        return outputs[0]

    def free(self, sequence_ids) -> int:
        return [m.free(sequence_ids) for m in self.ranks][0]

    def cached_sequence_ids(self):
        return self.ranks[0].cached_sequence_ids()


async def form_groups(world_size: int, timeout_s: float = 30) -> list[GlooGroup]:
    store = GlooGroup.host_store(world_size=world_size, timeout_s=timeout_s)
    address = f"127.0.0.1:{store.port}"
    return list(await asyncio.gather(*(join_group(r, world_size, address, timeout_s, "t", store if r == 0 else None)
                                       for r in range(world_size))))


def test_two_gloo_ranks_in_one_event_loop_match_transformers(mixtral_dir):
    config = ModelConfig.from_dir(mixtral_dir)
    experts = load_experts(mixtral_dir, [every_layer(config, range(config.num_experts))])
    requests = make_requests(config.vocab_size)

    async def main():
        groups = await form_groups(2)
        stages = [OneLoopTPStage([StageModel(config, a, b, CheckpointReader(mixtral_dir), tp=g) for g in groups])
                  for a, b in [(0, 4)]]
        await greedy_loop(stages, experts, requests)

    asyncio.run(asyncio.wait_for(main(), 120))
    check_against_reference(mixtral_dir, requests, "mixtral tp=2 gloo, one event loop")


def test_a_rank_that_never_joins_fails_within_the_timeout_and_the_loop_stays_free():
    async def main():
        store = GlooGroup.host_store(world_size=2, timeout_s=1.5)
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        with pytest.raises(TPJoinError, match=r"rank 0/2: could not join the group at 127\.0\.0\.1:\d+ within 1\.5 s"):
            await join_group(0, 2, f"127.0.0.1:{store.port}", 1.5, store=store)
        ticker.cancel()
        return time.monotonic() - started, ticks

    elapsed, ticks = asyncio.run(main())
    assert elapsed < 10 and ticks >= 10, (elapsed, ticks)


def test_a_peer_that_stops_stepping_fails_the_step_within_the_timeout(llama_dir):
    config = ModelConfig.from_dir(llama_dir)

    async def main():
        groups = await form_groups(2, timeout_s=2)
        models = [StageModel(config, 0, 2, CheckpointReader(llama_dir), tp=g) for g in groups]
        batch = StageBatch([1], [0], [3], torch.tensor([4, 5, 6]))
        await asyncio.gather(*(forward_off_loop(m, batch, None) for m in models))  # both step: fine
        started = time.monotonic()
        with pytest.raises(Unavailable, match="tp: t rank 0: all_reduce failed"):
            await forward_off_loop(models[0], StageBatch([2], [0], [1], torch.tensor([7])), None)  # rank 1 is gone
        assert models[0].cached_sequence_ids() == [1], "a failed step must not cache its sequence"
        return time.monotonic() - started

    assert asyncio.run(asyncio.wait_for(main(), 60)) < 20
