"""MoEStep (models/moe_step.py): one step's MoE glue shared by its layers gives, layer after layer,
the bits of MoEGate.dispatch and moe.combine (ties too), writes a lent `out` or makes the rows,
combines a packed answer into the step's one output and anything else (per-expert outputs, a
non-contiguous answer, other counts) by moe.combine with its errors; moe_block takes it at one rank."""

import asyncio

import pytest
import torch

from shardmesh.models import moe_kernel
from shardmesh.models.moe import MoEGate, combine
from shardmesh.models.moe_step import MoEStep
from shardmesh.models.packed_rows import PackedRows
from shardmesh.models.parallel import moe_block

T, H, E, K = 6, 24, 8, 2


def gates(count: int, seed: int) -> list[MoEGate]:
    generator = torch.Generator().manual_seed(seed)
    return [MoEGate(torch.randn(E, H, generator=generator) / H ** 0.5 * 3, K) for _ in range(count)]


def expert_answer(groups: PackedRows, layer: int) -> PackedRows:
    """A packed answer: each expert's rows scaled by its own factor (rows of one expert alike)."""
    scales = torch.cat([torch.full((n, 1), 0.5 + e + layer) for e, n in zip(groups.experts, groups.counts)])
    return PackedRows(groups.rows * scales, groups.experts, groups.counts)


def reference(gate: MoEGate, hidden_states, residual, layer, out=None):
    groups, handle = gate.dispatch(hidden_states, out=out)
    return groups, combine(expert_answer(groups, layer), handle, residual)


def test_layers_one_after_another_are_dispatch_and_combines_bits():
    """Three layers through one step: each layer's groups and combined rows are the bits of the
    per-layer verbs; every layer writes the step's one output; a lent `out` takes the rows."""
    layer_gates = gates(3, seed=1)
    step = MoEStep.of(T, MoEStep.shape_of(layer_gates))
    assert step is not None
    generator = torch.Generator().manual_seed(2)
    hidden_states = torch.randn(T, H, generator=generator)
    outputs = set()
    for layer, gate in enumerate(layer_gates):
        residual = torch.randn(T, H, generator=generator)
        lent = torch.full((T * K, H), float("nan")) if layer != 1 else None
        expected_groups, expected = reference(gate, hidden_states, residual, layer)
        groups = step.dispatch(gate, hidden_states, lent)
        assert groups.experts == expected_groups.experts and groups.counts == expected_groups.counts
        assert torch.equal(groups.rows, expected_groups.rows)
        assert lent is None or groups.rows is lent
        combined = step.combine(expert_answer(groups, layer), residual)
        assert torch.equal(combined, expected)
        outputs.add(combined.data_ptr())
        hidden_states = combined * 0.5  # the next layer's input (the attention half's, in a stage)
    assert outputs == {step.output.data_ptr()}


def test_ties_route_as_the_gate_routes_them():
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(3))
    weight = torch.stack([x[0] * 2, -x[0], x[0], -x[0], -x[0], x[0], -x[0], -x[0]])  # a tie at the boundary
    gate = MoEGate(weight, K)
    step = MoEStep(4, H, E, K)
    groups = step.dispatch(gate, x, None)
    expected, handle = gate.dispatch(x)
    assert (groups.experts, groups.counts) == (expected.experts, expected.counts)
    assert torch.equal(groups.rows, expected.rows)
    residual = torch.randn(4, H)
    assert torch.equal(step.combine(expert_answer(groups, 0), residual),
                       combine(expert_answer(expected, 0), handle, residual))


def test_other_answers_go_to_combine_with_its_checks():
    gate = gates(1, seed=4)[0]
    hidden_states, residual = torch.randn(T, H), torch.randn(T, H)
    step = MoEStep(T, H, E, K)
    groups = step.dispatch(gate, hidden_states, None)
    _, expected = reference(gate, hidden_states, residual, 0)
    answer = expert_answer(groups, 0)
    per_expert = {e: answer[e].clone() for e in answer}                     # a dict of outputs
    strided = torch.zeros(T * K, 2 * H)[:, ::2]                             # the same values, not contiguous
    strided.copy_(answer.rows)
    for outputs in (per_expert, PackedRows(strided, answer.experts, answer.counts)):
        combined = step.combine(outputs, residual)
        assert torch.equal(combined, expected) and combined.data_ptr() != step.output.data_ptr()
    missing = dict(per_expert)
    missing.pop(groups.experts[0])
    with pytest.raises(ValueError, match="no output for experts"):
        step.combine(missing, residual)
    if len(groups.experts) > 1:  # the same rows cut otherwise: not this dispatch's counts
        counts = (groups.counts[0] + 1, groups.counts[1] - 1, *groups.counts[2:])
        with pytest.raises(ValueError, match="returned shape"):
            step.combine(PackedRows(answer.rows, answer.experts, counts), residual)


def test_shapes_that_share_a_step():
    assert MoEStep.shape_of(gates(2, seed=5)) == (H, E, K)
    assert MoEStep.shape_of([]) is None
    assert MoEStep.shape_of([*gates(1, seed=5), MoEGate(torch.randn(E, H), K + 1)]) is None  # another top_k
    assert MoEStep.shape_of([MoEGate(torch.randn(E, H).bfloat16(), K)]) is None
    assert MoEStep.shape_of([MoEGate(torch.randn(H, E).t(), K)]) is None  # not contiguous


def test_off_with_the_moe_kernel(monkeypatch):
    monkeypatch.setenv("SHARDMESH_MOE_KERNEL", "0")
    moe_kernel._functions.cache_clear()
    try:
        assert MoEStep.of(T, (H, E, K)) is None
    finally:
        monkeypatch.undo()
        moe_kernel._functions.cache_clear()
    assert MoEStep.of(T, (H, E, K)) is not None and MoEStep.of(T, None) is None


class Lending:
    """An ExpertBackend with lend (as RemoteExperts): rows lent from its own buffer, packed answers."""

    def __init__(self):
        self.lent = []

    def lend(self, layer):
        backend = self

        class Lent:
            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

            def rows(self, count, width, dtype):
                backend.lent.append(torch.empty(count, width, dtype=dtype))
                return backend.lent[-1]

            async def run(self, groups):
                return expert_answer(groups, layer)
        return Lent()

    async def run(self, layer, groups):
        return expert_answer(groups, layer)


@pytest.mark.parametrize("lending", [True, False])
def test_moe_block_with_a_step_is_moe_block(lending):
    gate = gates(1, seed=6)[0]
    hidden_states, residual = torch.randn(T, H), torch.randn(T, H)
    backend = Lending() if lending else type("Plain", (), {"run": Lending.run})()
    expected = asyncio.run(moe_block(gate, hidden_states, backend, 3, residual=residual))
    step = MoEStep(T, H, E, K)
    got = asyncio.run(moe_block(gate, hidden_states, backend, 3, residual=residual, step=step))
    assert torch.equal(got, expected) and got.data_ptr() == step.output.data_ptr()
    assert not lending or step.groups.rows is backend.lent[-1]
