"""A large expert split tensor-parallel over expert servers (the topology's [[split_expert]]).

    piece = ExpertSlice(layer=0, expert=5, rank=1, tp=2)
    mlp = load_expert_slice(config, reader, piece, dtype)   # reads only its rows / columns
    partial = mlp(hidden_states)                             # [n, H], one of tp partial sums
    output = sum_slices([partial_0, partial_1])              # on the stage: == the whole expert

Slice r of T holds w1 (gate) and w3 (up) rows [r*I/T, (r+1)*I/T) (column-parallel) and the same
columns of w2 (down, row-parallel): w2(silu(w1 x) * w3 x) = sum over r of w2_r(silu(w1_r x) * w3_r x).
The row-parallel layer's collective is that sum, taken by the stage once every slice has
answered (stage_server/split_experts.py), so on the expert server it is the identity.

Shape legend: n tokens routed to the expert, H hidden_size, I intermediate_size, T slices.
"""

import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.models import get_family
from shardmesh.models.parallel import ParallelSwiGLUMLP
from shardmesh.topology import ExpertSlice


class PartialSum:
    """The 'group' of one expert slice: rank `rank` of `world_size` slices, whose partial outputs are
    summed elsewhere (by the stage), so all_reduce leaves the partial as it is."""

    def __init__(self, rank: int, world_size: int):
        assert 0 <= rank < world_size, (rank, world_size)
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def load_expert_slice(config: ModelConfig, reader: CheckpointReader, piece: ExpertSlice,
                      dtype: torch.dtype) -> ParallelSwiGLUMLP:
    """Slice `piece.rank` of `piece.tp` of one expert: gate_up [2I/T, H], down [H, I/T], read by get_slice."""
    if config.intermediate_size % piece.tp:
        raise ValueError(f"intermediate_size {config.intermediate_size} does not split into {piece.tp} slices")
    w1, w2, w3 = get_family(config.family).expert_weight_names(piece.layer, piece.expert)
    return ParallelSwiGLUMLP.load(reader, gate=w1, up=w3, down=w2, dtype=dtype,
                                  group=PartialSum(piece.rank, piece.tp))


def sum_slices(partials: list[torch.Tensor]) -> torch.Tensor:
    """The partial outputs [n, H] of slices 0..T-1, summed in slice order (the same bits wherever
    it is taken) -> the expert's output [n, H]."""
    total = partials[0].clone()
    for partial in partials[1:]:
        total += partial
    return total
