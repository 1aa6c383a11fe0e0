"""A tensor-parallel stage for tests: T StageModels (one per rank), each stepped in its own thread
with its own event loop, as T shard servers would be; they AllReduce through a ThreadGroup (in
process) or a GlooGroup (real gloo on loopback)."""

import asyncio
import concurrent.futures

import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import LocalExperts
from shardmesh.stage_model import StageBatch, StageModel
from shardmesh.tp_group import GlooGroup, ThreadGroup


def thread_groups(world_size: int) -> list[ThreadGroup]:
    return ThreadGroup.create(world_size, timeout_s=60)


def gloo_groups(world_size: int, timeout_s: float = 60) -> list[GlooGroup]:
    """World_size gloo groups in this process (formed concurrently, as separate servers would)."""
    store = GlooGroup.host_store(world_size=world_size, timeout_s=timeout_s)
    address = f"127.0.0.1:{store.port}"
    with concurrent.futures.ThreadPoolExecutor(world_size) as pool:
        futures = [pool.submit(GlooGroup, rank, world_size, address, timeout_s, "test",
                               store if rank == 0 else None) for rank in range(world_size)]
        return [future.result() for future in futures]


class TPStage:
    """Duck-types StageModel's forward/free/cached_sequence_ids for tests/test_model_local.greedy_loop."""

    def __init__(self, model_dir, start: int, end: int, groups, dtype=torch.float32):
        config = ModelConfig.from_dir(model_dir)
        self.readers = [CheckpointReader(model_dir) for _ in groups]
        self.ranks = [StageModel(config, start, end, reader, dtype, tp=group) for reader, group in zip(self.readers, groups)]
        self._pool = concurrent.futures.ThreadPoolExecutor(len(groups), thread_name_prefix="tp-rank")
        self.outputs_equal = True

    async def forward(self, batch: StageBatch, experts) -> torch.Tensor:
        """Every rank runs the step (with its own view of the experts); returns rank 0's output."""
        loop = asyncio.get_running_loop()

        def run(rank: int) -> torch.Tensor:
            rank_experts = LocalExperts(experts.shards) if experts is not None else None
            return asyncio.run(self.ranks[rank].forward(batch, rank_experts))

        outputs = await asyncio.gather(*(loop.run_in_executor(self._pool, run, r) for r in range(len(self.ranks))))
        self.outputs_equal &= all(torch.equal(outputs[0], o) for o in outputs[1:])
        return outputs[0]

    def free(self, sequence_ids) -> int:
        counts = {rank.free(sequence_ids) for rank in self.ranks}
        assert len(counts) == 1, counts
        return counts.pop()

    def cached_sequence_ids(self) -> list[int]:
        return self.ranks[0].cached_sequence_ids()

    def close(self) -> None:
        self._pool.shutdown()
