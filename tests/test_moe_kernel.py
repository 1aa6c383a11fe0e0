"""The C kernel path of the MoE verbs (models/moe_kernel.py, kernels/moe_routing.c): MoEGate.dispatch
picks the experts torch's route picks (ties included, as torch.topk breaks them), gathers the same
rows, weights within fp32 rounding; its combine is bit-identical to torch's combine on the same
handle, residual included; a token's row is the same bits alone as inside a batch; the groups are
views of one packed tensor that packed_groups sends without a copy; SHARDMESH_MOE_KERNEL=0 is torch."""

import asyncio

import pytest
import torch

from shardmesh.models import moe_kernel
from shardmesh.models.moe import MoEGate, _combine_torch, combine, dispatch, reference_moe, route
from shardmesh.models.parallel import moe_block

from stage_server.packed_groups import joined

from oracle import mixtral_moe_block



def gate_and_tokens(num_tokens: int, hidden: int, num_experts: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_experts, hidden, generator=generator) / hidden ** 0.5 * 3  # [E, H]
    return weight, torch.randn(num_tokens, hidden, generator=generator)                 # [T, H]


def token_sums(handle) -> torch.Tensor:
    """Each token's routing weights summed: [T]."""
    return torch.zeros(handle.num_tokens).index_add_(0, handle.token_idx, handle.weights.flatten())


def row_expert(e: int, x: torch.Tensor) -> torch.Tensor:
    """A row-wise expert (a matmul's bits may depend on its row count): distinct per expert."""
    scales = torch.linspace(-2, 2, x.shape[1]) * (e + 1)
    return x * scales + e


@pytest.mark.parametrize("num_tokens, hidden, num_experts, top_k", [
    (1, 512, 8, 2), (16, 512, 8, 2), (5, 20, 8, 2), (3, 8, 16, 3), (64, 16, 8, 2), (9, 8, 4, 4), (7, 33, 12, 1),
])
def test_kernel_dispatch_matches_torch(num_tokens, hidden, num_experts, top_k):
    weight, hidden_states = gate_and_tokens(num_tokens, hidden, num_experts, seed=num_tokens + hidden)
    gate = MoEGate(weight, top_k)
    before = moe_kernel.calls["dispatch"]
    groups, handle = gate.dispatch(hidden_states)
    assert moe_kernel.calls["dispatch"] == before + 1
    torch_groups, torch_handle = dispatch(hidden_states, gate(hidden_states), top_k)
    assert list(groups) == list(torch_groups) == list(handle.experts) == list(torch_handle.experts)
    assert handle.counts == torch_handle.counts
    for expert, rows in groups.items():
        assert torch.equal(rows, torch_groups[expert]), expert
    _, topk_idx = route(gate(hidden_states), top_k)
    assert torch.equal(handle.topk_idx.sort(-1).values, topk_idx.sort(-1).values)
    if torch_handle.token_idx is not None:
        assert torch.equal(handle.token_idx, torch_handle.token_idx)
    torch.testing.assert_close(token_sums(handle), torch.ones(num_tokens), rtol=0, atol=1e-6)
    if num_tokens > 1:
        torch.testing.assert_close(handle.weights, torch_handle.weights, rtol=1e-5, atol=1e-6)  # logits summed in another order
    residual = torch.randn(num_tokens, hidden)
    outputs = {e: row_expert(e, x) for e, x in groups.items()}
    combined = combine(outputs, handle, residual)
    expected = residual + reference_moe(hidden_states, gate(hidden_states), top_k, row_expert)
    torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens, top_k", [(1, 2), (16, 2), (6, 3)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("one_tensor", [False, True])
def test_kernel_combine_is_torch_combine_bitwise(num_tokens, top_k, with_residual, one_tensor):
    """Same weights and outputs: the kernel's combine (one pass, residual included) == torch's, bit for bit,
    whether the outputs are views of one packed answer or separate tensors."""
    weight, hidden_states = gate_and_tokens(num_tokens, 48, 8, seed=top_k)
    groups, handle = MoEGate(weight, top_k).dispatch(hidden_states)
    outputs = {e: row_expert(e, x) for e, x in groups.items()}  # separate tensors
    if one_tensor:
        answer = torch.cat([outputs[e] for e in handle.experts])
        outputs = dict(zip(handle.experts, answer.split_with_sizes(handle.counts)))
    residual = torch.randn(num_tokens, 48) if with_residual else None
    before = moe_kernel.calls["combine"]
    combined = combine(outputs, handle, residual)
    assert moe_kernel.calls["combine"] == before + 1
    expected = _combine_torch([outputs[e] for e in handle.experts], handle)
    if with_residual:
        expected = residual + expected
    assert torch.equal(combined, expected), (combined - expected).abs().max()


def test_a_token_alone_is_bitwise_its_row_in_a_batch():
    weight, hidden_states = gate_and_tokens(16, 512, 8, seed=7)
    residual = torch.randn(16, 512)
    gate = MoEGate(weight, 2)
    run = lambda x, r: combine({e: row_expert(e, g) for e, g in gate.dispatch(x)[0].items()}, gate.dispatch(x)[1], r)
    batch = run(hidden_states, residual)
    for t in range(16):
        alone = run(hidden_states[t:t + 1], residual[t:t + 1])
        assert torch.equal(alone, batch[t:t + 1]), t
        groups, handle = gate.dispatch(hidden_states[t:t + 1])
        batch_handle = gate.dispatch(hidden_states)[1]
        assert torch.equal(handle.weights.flatten(), batch_handle.weights[batch_handle.token_idx == t].flatten())


def test_ties_are_broken_as_torch_topk_breaks_them():
    """Equal gate rows give equal probabilities: the kernel defers to torch.topk, as transformers does."""
    hidden = 16
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(3))
    cases = {"all equal": torch.zeros(8, hidden),
             "tie at the boundary": torch.stack([x[0] * 2, -x[0], x[0], -x[0], -x[0], x[0], -x[0], -x[0]])}
    for name, weight in cases.items():
        for top_k in (1, 2, 3):
            gate = MoEGate(weight, top_k)
            groups, handle = gate.dispatch(x)
            _, topk_idx = route(gate(x), top_k)
            assert torch.equal(handle.topk_idx.sort(-1).values, topk_idx.sort(-1).values), (name, top_k)
            torch_groups, _ = dispatch(x, gate(x), top_k)
            assert list(groups) == list(torch_groups), (name, top_k)
            torch.testing.assert_close(token_sums(handle), torch.ones(4))


def test_nan_tokens_route_as_torch_routes_them():
    weight, hidden_states = gate_and_tokens(3, 16, 8, seed=5)
    hidden_states[1, 4] = float("nan")
    gate = MoEGate(weight, 2)
    _, handle = gate.dispatch(hidden_states)
    assert torch.equal(handle.topk_idx.sort(-1).values, route(gate(hidden_states), 2)[1].sort(-1).values)


def test_no_tokens():
    weight, _ = gate_and_tokens(0, 16, 8, seed=1)
    groups, handle = MoEGate(weight, 2).dispatch(torch.zeros(0, 16))
    assert groups == {} and handle.experts == () and handle.topk_idx.shape == (0, 2)
    assert combine({}, handle, torch.zeros(0, 16)).shape == (0, 16)


def test_groups_are_views_of_one_packed_tensor_sent_without_a_copy():
    weight, hidden_states = gate_and_tokens(16, 64, 8, seed=11)
    groups, _ = MoEGate(weight, 2).dispatch(hidden_states)
    inputs = list(groups.values())
    packed = joined(inputs)
    assert packed.data_ptr() == inputs[0].data_ptr() and packed.shape == (32, 64)
    assert torch.equal(packed, torch.cat(inputs))
    with torch.inference_mode():  # (views made there do not know their base)
        inference_inputs = list(MoEGate(weight, 2).dispatch(hidden_states)[0].values())
    assert inference_inputs[0]._base is None
    for pieces in (inputs[1:], inputs[:-1], inference_inputs):  # part of the packed tensor; no base known
        view = joined(pieces)
        assert view.data_ptr() == pieces[0].data_ptr() and torch.equal(view, torch.cat(pieces))
    # out of order, or not back to back: a copy, the same rows
    for pieces in (inputs[::-1], inputs[::2], [inputs[0], inputs[1].clone()]):
        glued = joined(pieces)
        assert torch.equal(glued, torch.cat(pieces))
        assert glued.data_ptr() != pieces[0].data_ptr()


def test_switch_off_uses_torch(monkeypatch):
    weight, hidden_states = gate_and_tokens(4, 32, 8, seed=2)
    gate = MoEGate(weight, 2)

    class Echo:
        async def run(self, layer, groups):
            return {e: row_expert(e, x) for e, x in groups.items()}

    on = asyncio.run(moe_block(gate, hidden_states, Echo(), 0, residual=hidden_states))
    monkeypatch.setenv("SHARDMESH_MOE_KERNEL", "0")
    moe_kernel._functions.cache_clear()
    try:
        before = dict(moe_kernel.calls)
        off = asyncio.run(moe_block(gate, hidden_states, Echo(), 0, residual=hidden_states))
        assert moe_kernel.calls == before
        assert gate.dispatch(hidden_states)[1].routing is None
    finally:
        monkeypatch.delenv("SHARDMESH_MOE_KERNEL")
        moe_kernel._functions.cache_clear()
    torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-6)


def test_kernel_path_matches_transformers_mixtral_block():
    """MoEGate.dispatch + combine against transformers' MixtralSparseMoeBlock (as test_moe_verbs does for torch's)."""
    gate_weight, hidden_states, expected, mlps = mixtral_moe_block(hidden=32, experts=8, tokens=13)
    groups, handle = MoEGate(gate_weight, 2).dispatch(hidden_states)
    assert handle.routing is not None
    ours = combine({e: mlps[e](x) for e, x in groups.items()}, handle)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
