"""Decode attention in the C kernel (models/decode_attention.py) == the SDPA path it replaces for
one-token sequences, writes the same cache slots, and gives each sequence the same bits whatever
else is in the call (issue 5: a stage's per-sequence attention overhead at batch 16)."""

import pytest
import torch

from shardmesh import kernels
from shardmesh.models import decode_attention
from shardmesh.models.decode_attention import DecodeTable
from shardmesh.models.layers import Attention, RotaryEmbedding, Segment, layer_caches
from shardmesh.models.parallel import HeadShard, QKVParallelLinear, RowParallelLinear
from shardmesh.tp_group import SINGLE


@pytest.fixture(autouse=True)
def kernel():
    assert kernels.kernel() is not None, "the CPU kernels did not build here (see the log): CI has gcc"


LAYERS, CAPACITY, HIDDEN = 2, 64, 64


def make_attention(heads: int, kv_heads: int, head_dim: int, generator: torch.Generator) -> Attention:
    attention = Attention.__new__(Attention)
    attention.num_heads, attention.num_kv_heads, attention.head_dim = heads, kv_heads, head_dim
    attention.scaling = head_dim ** -0.5
    shard = HeadShard(heads, kv_heads, 0, 0)
    qkv = torch.randn((heads + 2 * kv_heads) * head_dim, HIDDEN, generator=generator) * 0.3  # [(A + 2G) D, H]
    attention.qkv_proj = QKVParallelLinear(qkv, shard, head_dim)
    attention.o_proj = RowParallelLinear(torch.randn(HIDDEN, heads * head_dim, generator=generator) * 0.3, SINGLE)
    return attention


def run(attention, segments, buffers, hidden_states, layer, use_kernel):
    """One layer over the step -> (output [N, H], the buffers after it)."""
    buffers = [buffer.clone() for buffer in buffers]
    positions = torch.tensor([p for s in segments for p in range(s.start_position, s.start_position + s.num_tokens)])
    cos, sin = RotaryEmbedding(attention.head_dim, 10000.0)(positions, torch.float32)
    decode = DecodeTable.of(segments, buffers) if use_kernel else None
    if use_kernel:
        assert decode is not None
    caches = [None if decode is not None and i in decode.indices else layer_caches(buffer, segment)[layer]
              for i, (buffer, segment) in enumerate(zip(buffers, segments))]
    with torch.inference_mode():
        output = attention(hidden_states, cos, sin, segments, caches, decode, layer)
    return output, buffers


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 16), (8, 2, 32), (4, 1, 20)])
def test_kernel_equals_sdpa_in_a_mixed_step(heads, kv_heads, head_dim):
    generator = torch.Generator().manual_seed(heads + kv_heads + head_dim)
    attention = make_attention(heads, kv_heads, head_dim, generator)
    # decode (various cached lengths, the first token after one cached), a new prompt, a prompt chunk
    shapes = [(0, 1), (5, 1), (0, 4), (30, 1), (7, 3), (62, 1)]  # (start_position, num_tokens)
    segments, offset = [], 0
    for start, count in shapes:
        segments.append(Segment(offset, start, count))
        offset += count
    buffers = [torch.randn(LAYERS, 2, kv_heads, CAPACITY, head_dim, generator=generator) for _ in shapes]
    hidden_states = torch.randn(offset, HIDDEN, generator=generator)  # [N, H]
    before = kernels.calls["decode_attention"]
    fast, fast_buffers = run(attention, segments, buffers, hidden_states, 1, True)
    assert kernels.calls["decode_attention"] == before + 1
    slow, slow_buffers = run(attention, segments, buffers, hidden_states, 1, False)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for fast_buffer, slow_buffer in zip(fast_buffers, slow_buffers):
        assert torch.equal(fast_buffer, slow_buffer)  # the same slots written, nothing else


def test_each_sequence_is_independent_of_the_rest_of_the_call():
    generator = torch.Generator().manual_seed(5)
    A, G, D = 8, 2, 32
    starts = [3, 17, 0, 40, 9]
    buffers = [torch.randn(LAYERS, 2, G, CAPACITY, D, generator=generator) for _ in starts]
    segments = [Segment(i, start, 1) for i, start in enumerate(starts)]
    qkv = torch.randn(len(starts), A + 2 * G, D, generator=generator)                # [N, A + 2G, D]
    cos, sin = RotaryEmbedding(D, 10000.0)(torch.tensor(starts), torch.float32)      # [N, D] each
    whole = torch.empty(len(starts), A, D)
    whole_buffers = [b.clone() for b in buffers]
    DecodeTable.of(segments, whole_buffers).attend(1, qkv, cos, sin, 0.2, whole)
    for i, start in enumerate(starts):
        alone, alone_buffer = torch.zeros(1, A, D), buffers[i].clone()
        DecodeTable.of([Segment(0, start, 1)], [alone_buffer]).attend(
            1, qkv[i:i + 1].contiguous(), cos[i:i + 1].contiguous(), sin[i:i + 1].contiguous(), 0.2, alone)
        assert torch.equal(alone[0], whole[i])
        assert torch.equal(alone_buffer, whole_buffers[i])


def test_off_switch_and_torch_fallbacks(monkeypatch):
    buffers = [torch.zeros(LAYERS, 2, 2, CAPACITY, 8)]
    assert DecodeTable.of([Segment(0, 0, 3)], buffers) is None                     # no decode sequence
    assert DecodeTable.of([Segment(0, 2, 1)], [buffers[0].double()]) is None       # not fp32
    assert DecodeTable.of([Segment(0, 2, 1)], buffers) is not None
    monkeypatch.setenv("SHARDMESH_DECODE_ATTENTION", "0")
    decode_attention._function.cache_clear()
    try:
        assert DecodeTable.of([Segment(0, 2, 1)], buffers) is None
    finally:
        monkeypatch.delenv("SHARDMESH_DECODE_ATTENTION")
        decode_attention._function.cache_clear()
