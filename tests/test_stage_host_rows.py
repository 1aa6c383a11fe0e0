"""StageModel._host_rows (the step's rotary rows and embedding rows gathered with numpy on the CPU)
gives the same bits as torch's path (RotaryTable's index_select, F.embedding), across the rotary
table's growth (it holds positions in chunks of RotaryTable.CHUNK: the numpy arrays follow it)."""

import asyncio

import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard, LocalExperts
from shardmesh.models.layers import RotaryTable
from shardmesh.stage_model import StageBatch, StageModel


def test_host_rows_match_torch_s_rows_across_the_rotary_table_s_growth(mixtral_dir):
    config = ModelConfig.from_dir(mixtral_dir)
    experts = LocalExperts([ExpertShard(config, [(l, e) for l in range(config.num_layers)
                                                 for e in range(config.num_experts)], CheckpointReader(mixtral_dir))])
    host, plain = (StageModel(config, 0, config.num_layers, CheckpointReader(mixtral_dir)) for _ in range(2))
    plain._host_rows = lambda *_: None  # torch's path throughout
    used = []
    real = host._host_rows
    host._host_rows = lambda *args: used.append(real(*args) is not None) or real(*args)
    ids, length = [3, 9], 2 * RotaryTable.CHUNK + 5
    prompt = torch.arange(4, 4 + 2 * 6) % config.vocab_size  # 6 tokens each

    async def main():
        tokens = prompt
        starts, counts = [0, 0], [6, 6]
        while starts[0] + counts[0] <= length:
            batch = lambda: StageBatch(list(ids), list(starts), list(counts), tokens.clone())  # noqa: E731
            logits_host, logits_plain = await host.forward(batch(), experts), await plain.forward(batch(), experts)
            assert torch.equal(logits_host, logits_plain), starts
            starts = [s + c for s, c in zip(starts, counts)]
            counts = [1, 1]
            tokens = logits_host.argmax(-1)

    asyncio.run(main())
    assert host.rotary_rows.cos.shape[0] >= length  # grown twice past its first chunk
    assert used.count(False) == 3 and used.count(True) > 100  # torch grew it (to 64, 128, 192 rows), numpy the rest
