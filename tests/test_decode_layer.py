"""A decode layer's attention half in one threaded C call (models/decode_layer.py, kernels/decode_layer.c)
== the torch path it replaces (norms, q/k/v product, decode attention, o_proj, residual add), writes
the same cache slots, and gives every row the same bits alone or in any batch, on 1-3 threads and any
cut into units; the LM head on the same team (kernels.Kernel.linear_team) == kernels.Kernel.linear
(issue 5: a stage's per-op overhead at decode)."""

import asyncio

import pytest
import torch

from shardmesh import compute_pool, kernels
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard, LocalExperts
from shardmesh.models import decode_layer
from shardmesh.models.decode_attention import DecodeTable
from shardmesh.models.decode_layer import DecodeLayerStep, DecodeLayerWeights
from shardmesh.models.layers import Attention, RMSNorm, RotaryEmbedding, RotaryTable, Segment
from shardmesh.models.parallel import HeadShard, QKVParallelLinear, RowParallelLinear
from shardmesh.stage_model import StageBatch, StageModel
from shardmesh.tp_group import SINGLE


@pytest.fixture(scope="module")
def kernel():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    return loaded


LAYERS, CAPACITY = 2, 64


class Layer:
    """A random layer's attention half: norms, attention (weights scaled so outputs are O(1))."""

    def __init__(self, hidden, heads, kv_heads, head_dim, seed):
        generator = torch.Generator().manual_seed(seed)
        attention = Attention.__new__(Attention)
        attention.num_heads, attention.num_kv_heads, attention.head_dim = heads, kv_heads, head_dim
        attention.scaling = head_dim ** -0.5
        qkv = torch.randn((heads + 2 * kv_heads) * head_dim, hidden, generator=generator) * 0.3  # [(A + 2G) D, H]
        attention.qkv_proj = QKVParallelLinear(qkv, HeadShard(heads, kv_heads, 0, 0), head_dim)
        attention.o_proj = RowParallelLinear(torch.randn(hidden, heads * head_dim, generator=generator) * 0.3, SINGLE)
        self.attention = attention
        self.input_layernorm = RMSNorm(torch.randn(hidden, generator=generator), 1e-5)
        self.post_attention_layernorm = RMSNorm(torch.randn(hidden, generator=generator), 1e-6)
        self.weights = DecodeLayerWeights.of(self.input_layernorm, attention, self.post_attention_layernorm, 1)
        self.shape = (hidden, heads, kv_heads, head_dim)

    def step_inputs(self, starts, seed):
        """(segments, cache buffers [LAYERS, 2, G, CAPACITY, D] each, hidden_states [S, H], cos, signed_sin)."""
        hidden, _, kv_heads, head_dim = self.shape
        generator = torch.Generator().manual_seed(seed)
        buffers = [torch.randn(LAYERS, 2, kv_heads, CAPACITY, head_dim, generator=generator) for _ in starts]
        hidden_states = torch.randn(len(starts), hidden, generator=generator) * 3  # [S, H]
        cos, sin = RotaryEmbedding(head_dim, 10000.0)(torch.tensor(starts), torch.float32)
        return [Segment(i, start, 1) for i, start in enumerate(starts)], buffers, hidden_states, cos, sin

    def torch_path(self, segments, buffers, hidden_states, cos, sin, layer=1):
        """-> (residual, normed [S, H], buffers after): stage_model's attention half, the decode attention kernel inside."""
        buffers = [buffer.clone() for buffer in buffers]
        decode = DecodeTable.of(segments, buffers)
        with torch.inference_mode():
            attended = self.attention(self.input_layernorm(hidden_states), cos, sin, segments, [None] * len(segments),
                                      decode, layer)
            residual = hidden_states + attended
            return residual, self.post_attention_layernorm(residual), buffers

    def fused(self, segments, buffers, hidden_states, cos, sin, threads, unit_bytes=decode_layer.UNIT_BYTES, layer=1):
        """-> (residual, normed, buffers after, the step) by the kernel."""
        buffers = [buffer.clone() for buffer in buffers]
        decode = DecodeTable.of(segments, buffers)
        step = DecodeLayerStep(decode, cos, sin, [self.weights] * LAYERS, threads, unit_bytes)
        residual, normed = step.attention_half(layer, hidden_states)
        return residual, normed, buffers, step


# (H, A, G, D): GQA, MHA, one KV head; H = 72 and D = 20 are not multiples of the vector width (tails)
SHAPES = [(64, 8, 2, 16), (72, 4, 4, 32), (40, 4, 1, 20)]


# the first token after 0 cached, up to a full cache; 6 rows: dot products, 24: the outer-product form,
# 40: that form in two passes where vectors are 8 floats wide (AVX2: 32 rows a pass)
STARTS = {6: [3, 17, 0, 40, 9, 62], 24: [(7 * i) % 63 for i in range(24)], 40: [(5 * i) % 63 for i in range(40)]}


@pytest.mark.parametrize("rows", [6, 24, 40])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_the_torch_path(kernel, shape, rows):
    layer = Layer(*shape, seed=sum(shape))
    inputs = layer.step_inputs(STARTS[rows], seed=1)
    residual, normed, buffers = layer.torch_path(*inputs)
    before = kernels.calls["decode_layer"]
    fast_residual, fast_normed, fast_buffers, step = layer.fused(*inputs, threads=2, unit_bytes=1)
    assert kernels.calls["decode_layer"] == before + 1
    torch.testing.assert_close(fast_residual, residual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_normed, normed, rtol=1e-5, atol=1e-5)
    for segment, fast_buffer, slow_buffer, original in zip(inputs[0], fast_buffers, buffers, inputs[1]):
        slot = segment.start_position
        torch.testing.assert_close(fast_buffer[1, :, :, slot], slow_buffer[1, :, :, slot], rtol=1e-5, atol=1e-5)
        fast_buffer[1, :, :, slot] = original[1, :, :, slot]
        assert torch.equal(fast_buffer, original)  # nothing but layer 1's new slot written
    # the products are the torch path's linear's bits on the step's normed / attended rows
    hidden_states, linear = inputs[2], kernel.linear if rows <= 16 else kernel.linear_wide
    assert torch.equal(step.qkv, linear(step.normed, layer.attention.qkv_proj.weight))
    assert torch.equal(fast_residual, hidden_states + linear(step.attended, layer.attention.o_proj.weight))


@pytest.mark.parametrize("rows", [6, 24])
def test_rope_tables_by_position_give_the_rows_bits(kernel, rows):
    """cos/signed_sin as whole tables [P, D] read at each sequence's position (by_position, as a stage
    gives them: RotaryTable.covering) == the rows gathered per sequence; a table short of the longest
    sequence's position is refused."""
    layer = Layer(64, 8, 2, 16, seed=31)
    segments, buffers, hidden_states, cos, sin = layer.step_inputs(STARTS[rows], seed=4)
    written = [buffer.clone() for buffer in buffers]
    by_rows = DecodeLayerStep(DecodeTable.of(segments, written), cos, sin, [layer.weights] * LAYERS, 2)
    expected = (*by_rows.attention_half(1, hidden_states), *written)
    longest = max(STARTS[rows]) + 1
    table = RotaryTable(RotaryEmbedding(16, 10000.0), torch.float32)
    table_cos, table_sin = table.covering(longest)
    assert table_cos.shape[0] >= longest and torch.equal(table_cos[torch.tensor(STARTS[rows])], cos)
    written = [buffer.clone() for buffer in buffers]
    decode = DecodeTable.of(segments, written)
    step = DecodeLayerStep.of(segments, decode, table_cos, table_sin, [layer.weights] * LAYERS, 2, by_position=True)
    got = (*step.attention_half(1, hidden_states), *written)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    short = table_cos[:longest - 1], table_sin[:longest - 1]
    assert DecodeLayerStep.of(segments, decode, *short, [layer.weights] * LAYERS, 2, by_position=True) is None


@pytest.mark.parametrize("shape", SHAPES)
def test_the_step_norm_is_the_attention_halfs_norm(kernel, shape):
    """DecodeLayerStep.norm (a stage's final norm at decode): the bits of the attention half's post
    norm on the same rows, torch's RMSNorm up to rounding, a new tensor."""
    layer = Layer(*shape, seed=sum(shape) + 1)
    inputs = layer.step_inputs(STARTS[6], seed=2)
    residual, normed, _, step = layer.fused(*inputs, threads=2)
    again = step.norm(residual, layer.post_attention_layernorm)
    assert torch.equal(again, normed) and again.data_ptr() != normed.data_ptr()
    torch.testing.assert_close(again, layer.post_attention_layernorm(residual), rtol=1e-5, atol=1e-5)


def test_a_workspace_reuses_the_scratch_with_the_same_bits(kernel):
    """DecodeLayerStep's scratch from a workspace kept across steps (a stage's): the same outputs and
    cache writes as fresh scratch, step after step, across batch sizes (the outer-product form too)
    and lengths, and the same tensors reused while their shape fits."""
    layer = Layer(64, 8, 2, 16, seed=11)
    workspace, pointers = {}, []
    for seed, starts in enumerate([[3, 17, 0], [4, 18, 1], [40, 9, 62, 5, 7, 1] * 4, [5, 19, 2]]):
        segments, buffers, hidden_states, cos, sin = layer.step_inputs(starts, seed=seed)
        outputs = []
        for space in (None, workspace):
            written = [buffer.clone() for buffer in buffers]
            step = DecodeLayerStep(DecodeTable.of(segments, written), cos, sin, [layer.weights] * LAYERS, 2,
                                   workspace=space)
            outputs.append((*step.attention_half(1, hidden_states), *written))
        assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True)), starts
        pointers.append(step.qkv.data_ptr())
    assert pointers[0] == pointers[1] == pointers[3] != pointers[2]  # kept for 3 rows, another for 24


def test_a_step_writes_each_layer_into_the_same_outputs(kernel):
    """attention_half's outputs are the step's own two tensors, layer after layer (no allocation per
    layer), each layer's the bits a step of that one layer gives; an input that is one of them gets
    new ones."""
    layer = Layer(64, 8, 2, 16, seed=12)
    segments, buffers, hidden_states, cos, sin = layer.step_inputs([3, 17, 0, 9], seed=3)
    step = DecodeLayerStep(DecodeTable.of(segments, buffers), cos, sin, [layer.weights] * LAYERS, 2)
    outputs, expected = [], []
    for index, x in enumerate((hidden_states, hidden_states * 0.5)):
        alone = DecodeLayerStep(DecodeTable.of(segments, [b.clone() for b in buffers]), cos, sin,
                                [layer.weights] * LAYERS, 2)
        expected.append([t.clone() for t in alone.attention_half(index, x)])
        outputs.append([(t.data_ptr(), t.clone()) for t in step.attention_half(index, x)])
    assert [p for p, _ in outputs[0]] == [p for p, _ in outputs[1]]
    assert all(torch.equal(t, e) for got, want in zip(outputs, expected) for (_, t), e in zip(got, want))
    residual, _ = step.attention_half(0, step.outputs[1])
    assert residual.data_ptr() != outputs[0][0][0]


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_a_row_is_the_same_bits_alone_in_any_batch_on_any_threads(kernel, shape, wide):
    """Alone or in any batch of 1-16 rows (dot products); in any batch of 17-64 (the outer-product form)."""
    layer = Layer(*shape, seed=7)
    starts = [(11 * i + 5) % 63 for i in range(64)] if wide else [5, 30, 0, 12, 50, 7, 21, 1, 33]
    segments, buffers, hidden_states, cos, sin = layer.step_inputs(starts, seed=2)
    whole = layer.fused(segments, buffers, hidden_states, cos, sin, threads=1)
    cuts = ([list(range(3, 20)), list(range(40, 0, -2)), list(range(64))[::-1][:33]] if wide
            else [[4], [0, 8], [2, 3, 4, 5, 6], list(range(len(starts)))])
    for threads in (1, 2, 3):
        for unit_bytes in (1, 3000, 1 << 20):
            for rows in cuts:
                part = layer.fused([Segment(i, starts[r], 1) for i, r in enumerate(rows)], [buffers[r] for r in rows],
                                   hidden_states[rows].contiguous(), cos[rows].contiguous(), sin[rows].contiguous(),
                                   threads, unit_bytes)
                assert torch.equal(part[0], whole[0][rows]), (threads, unit_bytes, rows)
                assert torch.equal(part[1], whole[1][rows]), (threads, unit_bytes, rows)
                for i, r in enumerate(rows):
                    assert torch.equal(part[2][i], whole[2][r]), (threads, unit_bytes, rows)


def test_helper_threads_take_units(kernel):
    layer = Layer(64, 8, 2, 16, seed=3)
    inputs = layer.step_inputs([4, 9, 20, 33], seed=4)
    expected = layer.fused(*inputs, threads=1)[0]
    before = kernels.units["team_by_helpers"]
    for attempt in range(300):
        assert torch.equal(layer.fused(*inputs, threads=2, unit_bytes=1)[0], expected), attempt
        if attempt >= 20 and kernels.units["team_by_helpers"] > before:
            break
    assert kernels.units["team_by_helpers"] > before, "the helper thread never took a unit in 300 calls"


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("features", [(72, 1031), (512, 4096)])
def test_linear_team_is_linears_bits(kernel, rows, features):
    generator = torch.Generator().manual_seed(rows)
    K, M = features
    x, weight = torch.randn(rows, K, generator=generator), torch.randn(M, K, generator=generator)  # [n, K], [M, K]
    expected = kernel.linear(x, weight)
    for threads in (1, 2, 3):
        for unit_bytes in (1, 5000, 1 << 22):
            assert torch.equal(kernel.linear_team(x, weight, threads, unit_bytes), expected), (threads, unit_bytes)


def test_the_lm_head_takes_the_team_up_to_16_rows(kernel, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2048, 64, generator=generator)  # [V, H]
    for rows, team in ((1, True), (16, True), (17, False)):
        x = torch.randn(rows, 64, generator=generator)
        before = kernels.calls["linear_team"]
        out = compute_pool.parallel_linear(x, weight)
        assert (kernels.calls["linear_team"] == before + 1) == team, rows
        torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("SHARDMESH_TEAM_LINEAR", "0")
    before = kernels.calls["linear_team"]
    compute_pool.parallel_linear(torch.randn(4, 64), weight)
    assert kernels.calls["linear_team"] == before


def test_only_one_token_steps_of_whole_fp32_layers_take_the_kernel(kernel):
    layer = Layer(64, 8, 2, 16, seed=5)
    segments, buffers, _, cos, sin = layer.step_inputs([3, 8], seed=6)
    decode = DecodeTable.of(segments, buffers)
    assert DecodeLayerStep.of(segments, decode, cos, sin, [layer.weights] * LAYERS, 2) is not None
    mixed = [segments[0], Segment(1, 8, 3)]  # a prompt chunk in the step
    assert DecodeLayerStep.of(mixed, DecodeTable.of(mixed, buffers), cos, sin, [layer.weights] * LAYERS, 2) is None
    assert DecodeLayerStep.of(segments, decode, cos, sin, [layer.weights, None], 2) is None
    many = [Segment(i, 0, 1) for i in range(kernels.WIDE_PASS_ROWS + 1)]  # more than the kernel's products take
    assert DecodeLayerStep.of(many, DecodeTable.of(many, buffers * 33), cos, sin, [layer.weights] * LAYERS, 2) is None
    assert DecodeLayerStep.of(many[:-1], DecodeTable.of(many[:-1], buffers * 32), cos, sin, [layer.weights] * LAYERS,
                              2) is not None
    parts = (layer.input_layernorm, layer.attention, layer.post_attention_layernorm)
    assert DecodeLayerWeights.of(*parts, 2) is None  # a TP rank
    bf16 = RMSNorm(layer.input_layernorm.weight.bfloat16(), 1e-5)
    assert DecodeLayerWeights.of(bf16, *parts[1:], 1) is None


def decode_logits(model_dir, switch: str, monkeypatch, steps=4) -> list[torch.Tensor]:
    """A whole-model StageModel prefills 3 prompts then decodes greedily -> each decode step's logits [S, V]."""
    monkeypatch.setenv("SHARDMESH_DECODE_LAYER", switch)
    decode_layer._function.cache_clear()
    config = ModelConfig.from_dir(model_dir)
    stage = StageModel(config, 0, config.num_layers, CheckpointReader(model_dir))
    experts = LocalExperts([ExpertShard(config, [(l, e) for l in range(config.num_layers)
                                                 for e in range(config.num_experts)], CheckpointReader(model_dir))]) \
        if config.is_moe else None
    prompts = [[5, 9, 2, 7], [11, 3], [4, 4, 8, 1, 6]]
    ids = [1, 2, 3]
    final_norms = []  # DecodeLayerStep.norm's calls
    norm = DecodeLayerStep.norm
    monkeypatch.setattr(DecodeLayerStep, "norm", lambda *args: final_norms.append(1) or norm(*args))

    async def run():
        batch = StageBatch(ids, [0, 0, 0], [len(p) for p in prompts], torch.tensor(sum(prompts, [])))
        tokens, outputs = (await stage.forward(batch, experts)).argmax(-1), []
        for step in range(steps):
            before, norms = kernels.calls["decode_layer"], len(final_norms)
            logits = await stage.forward(StageBatch(ids, [len(p) + step for p in prompts], [1, 1, 1], tokens), experts)
            assert kernels.calls["decode_layer"] - before == (config.num_layers if switch == "1" else 0)
            assert len(final_norms) - norms == (1 if switch == "1" else 0)  # the final norm by the kernel's
            outputs.append(logits)
            tokens = logits.argmax(-1)
        return outputs

    try:
        return asyncio.run(run())
    finally:
        decode_layer._function.cache_clear()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("family", ["mixtral", "llama"])
def test_a_stage_decodes_as_with_the_torch_path(kernel, model_dirs, monkeypatch, family, threads):
    compute_pool.set_threads(threads)
    try:
        fast = decode_logits(model_dirs[family], "1", monkeypatch)
        slow = decode_logits(model_dirs[family], "0", monkeypatch)
    finally:
        compute_pool.set_threads(1)
    for fast_logits, slow_logits in zip(fast, slow):
        torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-5, atol=1e-5 * slow_logits.abs().max().item())
        assert torch.equal(fast_logits.argmax(-1), slow_logits.argmax(-1))
