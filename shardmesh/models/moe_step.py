"""MoEStep: one step's MoE glue (models/moe.py's gate + dispatch and combine, one C call each:
models/moe_kernel.py) for each of its MoE layers in turn, with what the layers share made once.

A stage's decode step resumes after each layer's expert call on caches the expert server has
flushed, where every torch op and attribute read costs microseconds: MoEGate.dispatch and combine
check their tensors and make a routing table, a handle and an output per layer (~200 us a layer
there). Here the step's shape is fixed and its tensors are the decode layer kernel's own (contiguous
fp32 [T, H]), so per layer only what comes from elsewhere is checked (the rows lent by the expert
call, its answer), and these are made once per step, not per layer:
- the routing table (KernelRouting): each layer's dispatch rewrites it, and that layer's combine reads
  it before the next layer's dispatch (a step runs its layers one after another);
- the combine's output [T, H]: each layer's is read by the next layer's attention half before the
  next combine writes it again; the last layer's is the step's result.
The bits are MoEGate.dispatch's and combine's (the same kernels on the same rows).

    step = MoEStep(T, H, E, K)
    groups = step.dispatch(gate, hidden_states, rows)          # PackedRows (in rows, or new ones)
    hidden_states = step.combine(await experts(groups), residual)

Shape legend: T tokens, H hidden_size, E experts, K experts per token.
"""

import torch

from shardmesh import kernels
from shardmesh.models import moe_kernel
from shardmesh.models.moe import DispatchHandle, MoEGate, combine
from shardmesh.models.packed_rows import PackedRows


class MoEStep:
    """One step's routing table and combine output, for its MoE layers one after another. Every
    hidden_states and residual given must be [T, H] contiguous fp32 on the CPU (the caller's word:
    the decode layer kernel's outputs), every gate's weight [E, H] too (MoEStep.shape_of)."""

    __slots__ = ("routing", "output", "hidden", "rows", "groups")

    def __init__(self, num_tokens: int, hidden: int, num_experts: int, top_k: int):
        self.routing = moe_kernel.KernelRouting(num_tokens, num_experts, top_k)
        self.output = torch.empty(num_tokens, hidden, dtype=torch.float32)  # [T, H]
        self.hidden = hidden
        self.rows = num_tokens * top_k  # T*K packed rows
        self.groups: PackedRows | None = None  # the last dispatch's

    @classmethod
    def of(cls, num_tokens: int, shape: tuple[int, int, int] | None) -> "MoEStep | None":
        """A step of `num_tokens` over gates of shape_of's `shape`; None when that is None or the MoE
        kernel is off (SHARDMESH_MOE_KERNEL=0 or no kernels): moe.py's verbs then."""
        if shape is None or moe_kernel._functions() is None:
            return None
        return cls(num_tokens, *shape)

    @staticmethod
    def shape_of(gates: list[MoEGate]) -> tuple[int, int, int] | None:
        """(H, E, K) when these gates (a stage's MoE layers) can share a step: weights [E, H] of one
        shape, contiguous fp32 on the CPU, one top_k; else None."""
        if not gates or len({(gate.weight.shape, gate.top_k) for gate in gates}) != 1 or not kernels.usable(
                *(gate.weight for gate in gates)):
            return None
        num_experts, hidden = gates[0].weight.shape
        return hidden, num_experts, gates[0].top_k

    def dispatch(self, gate: MoEGate, hidden_states: torch.Tensor, out: torch.Tensor | None) -> PackedRows:
        """gate.dispatch(hidden_states, out)'s groups: the packed rows [T*K, H], written into `out`
        when given (checked: float32 [T*K, H] contiguous on the CPU), else into a new tensor."""
        if out is None:
            out = torch.empty(self.rows, self.hidden, dtype=torch.float32)  # [T*K, H]
        else:
            moe_kernel.check_packed(out, self.rows, self.hidden)
        routing = self.routing
        moe_kernel.route(routing, self.hidden, hidden_states.data_ptr(), gate.weight.data_ptr(), out.data_ptr())
        counts = routing.counts()
        experts = tuple(e for e, count in enumerate(counts) if count)
        self.groups = PackedRows(out, experts, tuple(counts[e] for e in experts))
        return self.groups

    def combine(self, outputs, residual: torch.Tensor) -> torch.Tensor:
        """combine(outputs, the last dispatch's handle, residual) -> [T, H] float32: a packed answer of
        the dispatch's experts and counts (PackedRows of float32 [T*K, H] contiguous on the CPU) into
        the step's output; anything else by moe.combine (its checks and errors), into a new tensor."""
        groups = self.groups
        if type(outputs) is PackedRows and outputs.experts == groups.experts and outputs.counts == groups.counts:
            rows = outputs.rows
            if rows.dtype is torch.float32 and rows.is_cpu and rows.is_contiguous() and rows.shape == groups.rows.shape:
                moe_kernel.combine_packed_into(self.routing, self.hidden, rows.data_ptr(), residual.data_ptr(),
                                               self.output.data_ptr())
                return self.output
        handle = DispatchHandle(self.routing.num_tokens, self.hidden, torch.float32, groups.experts, groups.counts,
                                routing=self.routing)
        return combine(outputs, handle, residual)
