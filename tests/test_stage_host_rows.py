"""The step's rotary rows (RotaryTable.rows_at) and the first stage's embedding rows gathered with
numpy on the CPU give the same bits as torch's path (RotaryTable's index_select, F.embedding),
across the rotary table's growth (it holds positions in chunks of RotaryTable.CHUNK: the numpy
views follow it)."""

import array
import asyncio

import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard, LocalExperts
from shardmesh.models.layers import RotaryEmbedding, RotaryTable
from shardmesh.stage_model import StageBatch, StageModel


def test_rows_at_matches_index_select_across_growth():
    table = RotaryTable(RotaryEmbedding(16, 10000.0, torch.device("cpu")), torch.float32)
    generator = torch.Generator().manual_seed(0)
    for end in (5, RotaryTable.CHUNK + 1, 3 * RotaryTable.CHUNK):  # grows twice
        positions = torch.randint(0, end, (7,), generator=generator)
        cos, sin = table.rows_at(array.array("q", positions.tolist()), end)
        want_cos, want_sin = table(positions, end)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), end
        assert table._host is not None and table._host[0].shape[0] == table.cos.shape[0]  # numpy's gather


def test_host_rows_match_torch_s_rows_over_a_decode(mixtral_dir):
    config = ModelConfig.from_dir(mixtral_dir)
    experts = LocalExperts([ExpertShard(config, [(l, e) for l in range(config.num_layers)
                                                 for e in range(config.num_experts)], CheckpointReader(mixtral_dir))])
    host, plain = (StageModel(config, 0, config.num_layers, CheckpointReader(mixtral_dir)) for _ in range(2))
    assert host._embedding_rows is not None
    plain._embedding_rows = None  # torch's path throughout: F.embedding and index_select
    plain.rotary_rows.rows_at = lambda values, end: plain.rotary_rows(torch.frombuffer(values, dtype=torch.int64), end)
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
