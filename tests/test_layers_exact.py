"""The shared layers' faster formulations compute what the obvious ones do (issue 5: CPU per step).

Each fast path (fused RMSNorm, rotary with the sign folded into sin, per-step cache views, gate and
up as two matmuls) is checked against the plain formula it replaced, on random inputs."""

import pytest
import torch
import torch.nn.functional as F

from shardmesh.models.layers import (RMSNorm, RotaryEmbedding, RotaryTable, Segment, SwiGLUMLP, apply_rotary,
                                     layer_caches)


def rotate_half(states: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half: cat(-second half, first half)."""
    first, second = states.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_rotate_half(dtype):
    generator = torch.Generator().manual_seed(0)
    head_dim, theta = 16, 10000.0
    positions = torch.tensor([0, 1, 7, 300, 5])                                        # [N]
    states = torch.randn(5, 3, head_dim, generator=generator).to(dtype)                 # [N, heads, D]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.cat([positions[:, None].float() * inv_freq[None, :]] * 2, dim=-1)  # [N, D]
    cos, sin = angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]
    expected = states * cos + rotate_half(states) * sin
    rotated = apply_rotary(states, *RotaryEmbedding(head_dim, theta)(positions, dtype))
    assert torch.equal(rotated, expected)  # the minus moved into sin: the same products, bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rotary_table_rows_are_the_rotary_of_those_positions(dtype, head_dim):
    """RotaryTable (a stage's per-position cache) gives RotaryEmbedding's own bits, whatever the batch."""
    rotary = RotaryEmbedding(head_dim, 1e6)
    table = RotaryTable(rotary, dtype)
    for positions in ([0], [5, 300, 7, 1], list(range(130)), [63, 64, 65, 511], list(range(40, 57))):
        positions = torch.tensor(positions)
        direct, looked_up = rotary(positions, dtype), table(positions, int(positions.max()) + 1)
        assert all(a.is_contiguous() and torch.equal(a, b) for a, b in zip(looked_up, direct, strict=True))
    assert table.cos.shape == (512, head_dim)  # grown in whole chunks, up to the last position asked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_formula(dtype):
    generator = torch.Generator().manual_seed(1)
    hidden_states = (torch.randn(7, 64, generator=generator) * 5).to(dtype)  # [N, H]
    weight = torch.randn(64, generator=generator).to(dtype)                  # [H]
    as_float = hidden_states.float()
    expected = weight * (as_float * torch.rsqrt(as_float.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    torch.testing.assert_close(RMSNorm(weight, 1e-5)(hidden_states), expected, rtol=1e-6, atol=1e-6)


def test_layer_caches_are_views_of_each_layer():
    layers, kv_heads, capacity, head_dim = 3, 2, 16, 4
    buffer = torch.zeros(layers, 2, kv_heads, capacity, head_dim)  # [layers, 2, G, capacity, D]
    caches = layer_caches(buffer, Segment(offset=5, start_position=6, num_tokens=2))
    assert len(caches) == layers
    for layer, cache in enumerate(caches):
        assert list(cache.new_slots.shape) == [2, kv_heads, 2, head_dim]
        assert list(cache.keys.shape) == list(cache.values.shape) == [1, kv_heads, 8, head_dim]
        cache.new_slots[0].fill_(layer + 1)    # keys of positions 6, 7
        cache.new_slots[1].fill_(-layer - 1)   # values
    for layer, cache in enumerate(caches):
        assert (buffer[layer, 0, :, 6:8] == layer + 1).all() and (buffer[layer, 1, :, 6:8] == -layer - 1).all()
        assert torch.equal(cache.keys[0], buffer[layer, 0, :, :8]) and torch.equal(cache.values[0], buffer[layer, 1, :, :8])
    assert (buffer[:, :, :, :6] == 0).all() and (buffer[:, :, :, 8:] == 0).all()  # nothing else written


@pytest.mark.parametrize("rows", [0, 1, 3, 4, 9])
def test_expert_mlp_equals_fused_gate_up(rows):
    generator = torch.Generator().manual_seed(rows)
    gate, up, down = (torch.randn(shape, generator=generator) for shape in ((48, 32), (48, 32), (32, 48)))
    hidden_states = torch.randn(rows, 32, generator=generator)                     # [n, H]
    fused_gate, fused_up = F.linear(hidden_states, torch.cat([gate, up])).chunk(2, dim=-1)
    expected = F.linear(F.silu(fused_gate) * fused_up, down)                        # the former formulation
    mlp = SwiGLUMLP(gate, up, down)
    mlp.kernel = None  # torch's split matmuls; the C kernel's own sums are checked in tests/test_cpu_kernels.py
    torch.testing.assert_close(mlp(hidden_states), expected, rtol=1e-6, atol=1e-5)
