"""Tensor-parallel linear layers: each owns how it slices the checkpoint and its one collective.

    qkv_proj = QKVParallelLinear.load(reader, prefix, config, group, dtype)  # this rank's heads
    o_proj = RowParallelLinear.load(reader, name, group, dtype, dim_start, dim_end)
    attention_out = o_proj(per_head_outputs)                                 # AllReduce inside

At world size 1 every layer reads the whole tensor and is a plain linear (models.matmul); at T ranks:
    column-parallel (q/k/v, gate/up): rank r holds rows r of T of the output features, no collective;
    row-parallel (o_proj, down_proj): rank r holds the matching input columns; its partial output is
        AllReduced (summed) over the group, so every rank holds the whole output.
Query heads split evenly; key/value heads too when there are at least T of them, else each KV head
is replicated on T/G ranks (as vLLM does): rank r holds KV head r*G//T, the one its query heads use.
Each rank reads only its slice from disk (`CheckpointReader.get_slice`).

Shape legend: N tokens, H hidden_size, A/G query/KV heads (whole model), a/g this rank's, D head_dim,
I intermediate_size, T world size.
"""

import dataclasses
import typing

import torch
import torch.nn.functional as F

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.models.matmul import linear
from shardmesh.models.moe import MoEGate, combine
from shardmesh.tp_group import SINGLE, TPGroup, TPStepFailed, all_reduce_agreeing

if typing.TYPE_CHECKING:
    from shardmesh.models.moe_step import MoEStep


def check_tp_shapes(config: ModelConfig, world_size: int) -> None:
    """ValueError unless `config` splits evenly over `world_size` ranks."""
    A, G, T = config.num_attention_heads, config.num_key_value_heads, world_size
    problems = []
    if A % T:
        problems.append(f"num_attention_heads {A} is not divisible by tp {T}")
    if G % T and T % G:
        problems.append(f"num_key_value_heads {G} neither divides nor is divisible by tp {T}")
    if not config.is_moe and config.intermediate_size % T:
        problems.append(f"intermediate_size {config.intermediate_size} is not divisible by tp {T}")
    if problems:
        raise ValueError(f"cannot shard {config.family} over {T} ranks: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """Which heads rank `rank` of `world_size` holds."""

    num_heads: int        # a = A / T
    num_kv_heads: int     # g = G / T, or 1 when G < T (replicated)
    first_head: int       # r * a
    first_kv_head: int    # r * g, or r * G // T when replicated

    @classmethod
    def of(cls, config: ModelConfig, group: TPGroup) -> "HeadShard":
        A, G, T, r = config.num_attention_heads, config.num_key_value_heads, group.world_size, group.rank
        heads = A // T
        if G >= T:
            return cls(heads, G // T, r * heads, r * (G // T))
        return cls(heads, 1, r * heads, r * G // T)


class ColumnParallelLinear:
    """y = x W_r^T: W_r is this rank's slice of the output features of one or more checkpoint
    weights, concatenated (gate+up merged, or q+k+v). No collective: output stays split."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out / T, in]

    @classmethod
    def load(cls, reader: CheckpointReader, parts: list[tuple[str, int, int]], dtype: torch.dtype) -> "ColumnParallelLinear":
        """parts: (name, first row, end row) of each weight, read in order and concatenated by rows."""
        slices = []
        for name, start, end in parts:
            whole = start == 0 and end == reader_rows(reader, name)
            slices.append(reader.get(name, dtype) if whole else reader.get_slice(name, 0, start, end, dtype))
        return cls(torch.cat(slices) if len(slices) > 1 else slices[0])

    @classmethod
    def load_merged(cls, reader: CheckpointReader, names: list[str], group: TPGroup,
                    dtype: torch.dtype) -> "ColumnParallelLinear":
        """Each weight split evenly by rows over the group (gate_proj + up_proj -> [2I/T, H])."""
        parts = []
        for name in names:
            rows = reader_rows(reader, name) // group.world_size
            parts.append((name, group.rank * rows, (group.rank + 1) * rows))
        return cls.load(reader, parts, dtype)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return linear(hidden_states, self.weight)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections of this rank's heads, one matmul: x [N, H] -> [N, (a + 2g) * D]."""

    def __init__(self, weight: torch.Tensor, heads: HeadShard, head_dim: int):
        super().__init__(weight)
        self.heads, self.head_dim = heads, head_dim

    @classmethod
    def load_heads(cls, reader: CheckpointReader, prefix: str, config: ModelConfig, group: TPGroup,
                   dtype: torch.dtype) -> "QKVParallelLinear":
        """Reads this rank's rows of `{prefix}{q,k,v}_proj.weight`."""
        heads, D = HeadShard.of(config, group), config.head_dim
        q_rows = (heads.first_head * D, (heads.first_head + heads.num_heads) * D)
        kv_rows = (heads.first_kv_head * D, (heads.first_kv_head + heads.num_kv_heads) * D)
        linear = ColumnParallelLinear.load(reader, [(f"{prefix}q_proj.weight", *q_rows),
                                                    (f"{prefix}k_proj.weight", *kv_rows),
                                                    (f"{prefix}v_proj.weight", *kv_rows)], dtype)
        return cls(linear.weight, heads, D)


class RowParallelLinear:
    """y = AllReduce(x_r W_r^T): x_r is this rank's share of the input features (the output of a
    column-parallel layer), W_r the matching columns. Every rank gets the whole y."""

    def __init__(self, weight: torch.Tensor, group: TPGroup):
        self.weight = weight  # [out, in / T]
        self.group = group

    @classmethod
    def load(cls, reader: CheckpointReader, name: str, group: TPGroup, dtype: torch.dtype,
             columns: tuple[int, int] | None = None) -> "RowParallelLinear":
        """columns: this rank's input features [start, end); default an even split by rank."""
        if group.world_size == 1:
            return cls(reader.get(name, dtype), group)
        if columns is None:
            width = reader.get_slice_shape(name)[1] // group.world_size
            columns = (group.rank * width, (group.rank + 1) * width)
        return cls(reader.get_slice(name, 1, *columns, dtype), group)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(linear(hidden_states, self.weight))


def reader_rows(reader: CheckpointReader, name: str) -> int:
    return reader.get_slice_shape(name)[0]


class ParallelSwiGLUMLP:
    """A stage's dense MLP: down(silu(gate x) * up x), gate/up column-parallel, down row-parallel.
    (Experts, whole on expert servers, use `layers.SwiGLUMLP`.)"""

    def __init__(self, gate_up_proj: ColumnParallelLinear, down_proj: RowParallelLinear):
        self.gate_up_proj = gate_up_proj  # [2I/T, H]
        self.down_proj = down_proj        # [H, I/T]

    @classmethod
    def load(cls, reader: CheckpointReader, gate: str, up: str, down: str, dtype: torch.dtype,
             group: TPGroup = SINGLE) -> "ParallelSwiGLUMLP":
        return cls(ColumnParallelLinear.load_merged(reader, [gate, up], group, dtype),
                   RowParallelLinear.load(reader, down, group, dtype))

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, H] (AllReduced)."""
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)  # [N, I/T] each
        return self.down_proj(F.silu(gate) * up)


async def moe_block(gate: MoEGate, hidden_states: torch.Tensor, experts, layer: int,
                    group: TPGroup = SINGLE, residual: torch.Tensor | None = None,
                    step: "MoEStep | None" = None) -> torch.Tensor:
    """The MoE block of a stage: gate (replicated), dispatch to `experts` (an ExpertBackend), combine.

    hidden_states [N, H] -> [N, H] (+ residual [N, H] when given: combined in the same pass). At T
    ranks every rank holds the same hidden_states; rank r sends only its contiguous 1/T of the tokens
    to the experts and the ranks' outputs (zeros outside their rows) are summed, so each token's
    experts run once rather than T times. At one rank, a backend with `lend` (RemoteExperts.lend) may
    give room for the dispatched rows where its call sends them from, and lends its outputs for the
    combine where the answer arrived (no copy either way). step: the step's MoEStep (models/moe_step.py:
    hidden_states and residual are then its [T, H] contiguous fp32), whose glue it uses at one rank:
    the same bits."""
    if group.world_size == 1:
        lend = getattr(experts, "lend", None)  # RemoteExperts.lend: groups and answer where the call moves them
        if step is not None:
            if lend is None:
                return step.combine(await experts.run(layer, step.dispatch(gate, hidden_states, None)), residual)
            async with lend(layer) as lent:  # (the answer is read inside the block, as below)
                rows = lent.rows(step.rows, step.hidden, torch.float32)
                return step.combine(await lent.run(step.dispatch(gate, hidden_states, rows)), residual)
        if lend is None:
            groups, handle = gate.dispatch(hidden_states)
            return combine(await experts.run(layer, groups), handle, residual)  # in hidden_states' dtype
        async with lend(layer) as lent:
            # [T*K, H] in the call's shared-memory segment when it has room: dispatched there, sent as it lies
            rows = lent.rows(hidden_states.shape[0] * gate.top_k, hidden_states.shape[1], hidden_states.dtype)
            groups, handle = gate.dispatch(hidden_states, out=rows)
            return combine(await lent.run(groups), handle, residual)  # the outputs are valid inside the block only
    num_tokens, hidden, rank, world_size = *hidden_states.shape, group.rank, group.world_size
    start, end = rank * num_tokens // world_size, (rank + 1) * num_tokens // world_size
    # [N * H + T]: the output and one failure flag per rank, summed by the one collective, so that an
    # expert call failing on one rank fails the step on every rank at the same point (TPStepFailed).
    flat = torch.zeros(num_tokens * hidden + world_size, dtype=hidden_states.dtype, device=hidden_states.device)
    output = flat[:num_tokens * hidden].view(num_tokens, hidden)  # [N, H]
    failure = None
    if end > start:
        mine = hidden_states[start:end]       # [n_r, H]
        try:
            groups, handle = gate.dispatch(mine)
            output[start:end] = combine(await experts.run(layer, groups), handle)
        except Exception as error:  # the other ranks wait in the collective below: join them, flagged
            failure = error
            output.zero_()
    reduced, failed_ranks = all_reduce_agreeing(group, flat, failure is not None)
    if failed_ranks:
        cause = f": {failure}" if failure is not None else ""
        raise TPStepFailed("experts", f"layer {layer}: the expert calls of rank(s) {failed_ranks} failed, so the step "
                                      f"{TPStepFailed.MARKER} (no KV kept; the group stays){cause}")
    combined = reduced[:num_tokens * hidden].view(num_tokens, hidden)
    return combined if residual is None else residual + combined
