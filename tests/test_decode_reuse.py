"""A stage's decode table and decode layer step kept from one step to the next (StageModel._decode_reuse,
DecodeTable.of / DecodeLayerStep.of with `previous`): reused only while a step has the same sequences,
in the same order, one token each, over the same cache buffers; every change between steps (a
buffer grown, a sequence freed or added, another order, a sequence with more tokens, other threads,
lengths past the kept scratch) gives the bits of a stage that builds them afresh each step."""

import asyncio
import gc
import weakref

import pytest
import torch

from shardmesh import compute_pool, kernels
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard, LocalExperts
from shardmesh.models import decode_layer
from shardmesh.models.decode_attention import DecodeTable
from shardmesh.models.decode_layer import SCRATCH_STEP, DecodeLayerStep
from shardmesh.models.layers import RotaryEmbedding, RotaryTable, Segment
from shardmesh.stage_model import StageBatch, StageModel

from test_decode_layer import Layer


@pytest.fixture(scope="module")
def kernel():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    return loaded


def stages(model_dir):
    config = ModelConfig.from_dir(model_dir)
    reader = CheckpointReader(model_dir)
    experts = LocalExperts([ExpertShard(config, [(l, e) for l in range(config.num_layers)
                                                 for e in range(config.num_experts)], reader)]) if config.is_moe else None
    return StageModel(config, 0, config.num_layers, reader), StageModel(config, 0, config.num_layers, reader), experts


# (sequence ids, tokens of each) per step, run in order; a sequence's start is what it has cached
SCRIPT = [
    ([1, 2, 3], [14, 3, 1]),   # prompts
    ([1, 2, 3], [1, 1, 1]),    # decode: built
    ([1, 2, 3], [1, 1, 1]),    # reused
    ([1, 2, 3], [1, 1, 1]),    # sequence 1 reaches 17 tokens: its buffer grows (16 -> 32)
    ([1, 2, 3], [1, 1, 1]),    # reused over the grown buffer
    ([1, 2, 3], [2, 1, 1]),    # same buffers, but sequence 1 takes two tokens
    ([3, 1, 2], [1, 1, 1]),    # another order
    ([3, 1, 2], [1, 1, 1]),    # reused
    ([3, 1, 2], [1, 1, 2]),    # the last row takes two tokens (the rows before as they were)
    ([3, 1], [1, 1]),          # fewer sequences
    ([3, 1, 2], [1, 1, 1]),
    "free 2",
    ([4, 3, 1], [3, 1, 1]),    # a prompt before the decodes: their rows are 3 and 4
    ([3, 1], [1, 1]),          # the same decode buffers, at rows 0 and 1
    ([3, 1], [1, 1]),          # reused
    ([3, 1, 4], [1, 1, 1]),    # a sequence added
    ([3, 1, 4], [1, 1, 1]),    # reused
]
REUSED = {2, 4, 7, 14, 16}  # the steps of SCRIPT whose table is the step before's (no buffer grows past 16 but 1's)


@pytest.mark.parametrize("family, threads, layer_kernel", [
    ("mixtral", 1, "1"), ("mixtral", 2, "1"), ("llama", 2, "1"),
    ("mixtral", 1, "0"),  # the decode attention kernel under torch's attention half: the table alone kept
])
def test_steps_with_reuse_are_steps_built_afresh(kernel, model_dirs, monkeypatch, family, threads, layer_kernel):
    monkeypatch.setenv("SHARDMESH_DECODE_LAYER", layer_kernel)
    decode_layer._function.cache_clear()
    reusing, fresh, experts = stages(model_dirs[family])
    generator = torch.Generator().manual_seed(7)
    vocab = reusing.config.vocab_size

    async def run():
        reused = set()
        for index, step in enumerate(SCRIPT):
            if step == "free 2":
                assert reusing.free([2]) == fresh.free([2]) == 1
                continue
            ids, counts = step
            batch = StageBatch(ids, [reusing.cached_length(i) for i in ids], counts,
                               torch.randint(0, vocab, (sum(counts),), generator=generator))
            before = reusing._decode_reuse
            fresh._decode_reuse = None
            expected = await fresh.forward(batch, experts)
            got = await reusing.forward(batch, experts)
            assert torch.equal(got, expected), index
            table = reusing._decode_reuse[0] if reusing._decode_reuse else None
            assert table is None or table._scratch is None or table._scratch.numel() >= table.scratch_length
            if before is not None and reusing._decode_reuse is not None and reusing._decode_reuse[0] is before[0]:
                reused.add(index)
                assert reusing._decode_reuse[1] is before[1]  # the decode layer step too
                assert (before[1] is not None) == (layer_kernel == "1")
        for sequence_id in reusing.cached_sequence_ids():
            assert torch.equal(reusing.cache._buffers[sequence_id][..., :reusing.cached_length(sequence_id), :],
                               fresh.cache._buffers[sequence_id][..., :fresh.cached_length(sequence_id), :])
        return reused

    compute_pool.set_threads(threads)
    try:
        assert asyncio.run(run()) == REUSED
    finally:
        compute_pool.set_threads(1)
        monkeypatch.undo()
        decode_layer._function.cache_clear()


def test_free_lets_the_buffers_go(kernel, model_dirs):
    stage, _, experts = stages(model_dirs["mixtral"])

    async def run():
        await stage.forward(StageBatch([1], [0], [3], torch.tensor([5, 6, 7])), experts)
        await stage.forward(StageBatch([1], [3], [1], torch.tensor([8])), experts)

    asyncio.run(run())
    assert stage._decode_reuse is not None
    kept = weakref.ref(stage.cache._buffers[1])
    stage.free([1])
    gc.collect()
    assert kept() is None and stage._decode_reuse is None


def decode_step(layer: Layer, buffers, starts, threads, previous=None, workspace=None):
    segments = [Segment(i, start, 1) for i, start in enumerate(starts)]
    decode = DecodeTable.of(segments, buffers, previous.decode if previous else None)
    cos, sin = RotaryEmbedding(layer.shape[3], 10000.0)(torch.tensor(starts), torch.float32)
    return DecodeLayerStep.of(segments, decode, cos, sin, layer.layers, threads, workspace=workspace,
                              previous=previous)


def test_a_layer_step_is_kept_only_while_its_scratch_and_threads_fit(kernel):
    layer = Layer(64, 8, 2, 16, seed=21)
    layer.layers = [layer.weights] * 2  # the stage's list of its layers (one object, step after step)
    buffers = [torch.zeros(2, 2, 2, 2 * SCRATCH_STEP, 16) for _ in range(3)]
    workspace = {}
    first = decode_step(layer, buffers, [10, 20, 30], 2, workspace=workspace)
    assert decode_step(layer, buffers, [11, 21, 31], 2, first, workspace) is first
    longer = [SCRATCH_STEP - 16, 21, 31]  # L_max + D past the kept stride: new scratch
    grown = decode_step(layer, buffers, longer, 2, first, workspace)
    assert grown is not first and grown.decode is first.decode
    assert grown.struct.scratch_stride >= SCRATCH_STEP + 1
    assert decode_step(layer, buffers, longer, 1, grown, workspace) is not grown  # another team size
    segments = [Segment(i, start, 1) for i, start in enumerate(longer)]
    cos, sin = RotaryTable(RotaryEmbedding(16, 10000.0), torch.float32).covering(SCRATCH_STEP)
    by_position = DecodeLayerStep.of(segments, grown.decode, cos, sin, layer.layers, 2, workspace=workspace,
                                     previous=grown, by_position=True)  # another form of the RoPE rows
    assert by_position is not grown and by_position.struct.by_position
    assert DecodeLayerStep.of(segments, grown.decode, cos, sin, layer.layers, 2, workspace=workspace,
                              previous=by_position, by_position=True) is by_position
    short = cos[:SCRATCH_STEP - 16], sin[:SCRATCH_STEP - 16]  # no row for the longest sequence's position
    assert DecodeLayerStep.of(segments, grown.decode, *short, layer.layers, 2, workspace=workspace,
                              previous=by_position, by_position=True) is None
    other = [torch.zeros_like(buffers[0]), *buffers[1:]]
    assert decode_step(layer, other, [12, 22, 32], 2, grown, workspace).decode is not grown.decode
