"""Experts of an MoE model held by one process: `ExpertShard` (the math) and `LocalExperts` (an
in-process `ExpertBackend` over shards, for tests and one-process use).

Shape legend: n tokens routed to one expert, H hidden_size.
"""

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from shardmesh import compute_pool, kernels
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.errors import InvalidArgument, NotFound, Unavailable
from shardmesh.models import get_family
from shardmesh.models.layers import SwiGLUMLP
from shardmesh.models.parallel import ParallelSwiGLUMLP
from shardmesh.split_expert import load_expert_slice
from shardmesh.topology import ExpertSlice


MAX_PACKED_PLANS = 4096  # (layer, experts) lists remembered by ExpertShard.packed_plan; forgotten at once past it


class PackedPlan(NamedTuple):
    """What ExpertShard.compute_packed needs of one (layer, experts) list, made once."""
    experts: tuple[int, ...]
    mlps: list[SwiGLUMLP]
    kernel: "kernels.Kernel | None"  # the one C kernel every expert's weights go to; None: torch
    table: "kernels.ExpertTable | None"  # the experts' weights as that kernel takes them


class ExpertShard:
    def __init__(self, config: ModelConfig, experts: Iterable[tuple[int, int]], reader: CheckpointReader,
                 dtype: torch.dtype = torch.float32, slices: Iterable[ExpertSlice] = ()):
        """Loads only `block_sparse_moe.experts.E.{w1,w2,w3}` of each (layer, expert) in `experts`,
        and only its rows / columns of each slice of a split expert in `slices` (shardmesh.split_expert)."""
        family = get_family(config.family)
        if not config.is_moe or not hasattr(family, "load_expert"):
            raise ValueError(f"{config.family} is a dense model: it has no experts to hold")
        self.config = config
        self.dtype = dtype
        self.device = torch.device(reader.device)
        self._family = family
        self.experts: list[tuple[int, int]] = []
        self._mlps: dict[tuple[int, int], SwiGLUMLP] = {}
        # (layer, experts) -> its PackedPlan: the same few lists come every step; emptied whenever
        # the experts held change (install, remove), so a plan never names an expert not held.
        self._plans: dict[tuple[int, tuple[int, ...]], PackedPlan] = {}
        self.add(experts, reader)
        self.slices: dict[tuple[int, int], tuple[ExpertSlice, ParallelSwiGLUMLP]] = {
            (piece.layer, piece.expert): (piece, load_expert_slice(config, reader, piece, dtype)) for piece in slices}

    def holds_slice(self, layer: int, expert: int, rank: int, tp: int) -> bool:
        held = self.slices.get((layer, expert))
        return held is not None and (held[0].rank, held[0].tp) == (rank, tp)

    def compute_slice(self, layer: int, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """This server's slice of a split expert: [n, H] -> its partial output [n, H] (the stage sums
        the slices'). The caller has checked `holds_slice` and the shape."""
        return self.slices[(layer, expert)][1](hidden_states.to(self.device, self.dtype))

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._mlps

    def read(self, experts: Iterable[tuple[int, int]], reader: CheckpointReader, warm: bool = False) -> dict:
        """Read these experts (those not held yet) from the checkpoint without installing them:
        (layer, expert) -> module. warm: run each once on one zero token. Touches no state of the
        shard, so it may run in a worker thread while the shard serves."""
        keys = sorted(set((int(l), int(e)) for l, e in experts))
        for layer, expert in keys:
            if not (0 <= layer < self.config.num_layers and 0 <= expert < self.config.num_experts):
                raise ValueError(f"(layer {layer}, expert {expert}) is outside {self.config.num_layers} layers "
                                 f"x {self.config.num_experts} experts")
        # on 2 MiB pages where the C kernel streams them (SwiGLUMLP.on_huge_pages)
        mlps = {key: self._family.load_expert(reader, *key, self.dtype).on_huge_pages()
                for key in keys if key not in self._mlps}
        if warm:
            probe = torch.zeros(1, self.config.hidden_size, dtype=self.dtype, device=self.device)  # [1, H]
            for mlp in mlps.values():
                mlp(probe)
        return mlps

    def install(self, mlps: dict) -> None:
        """Serve what `read` returned (a dict assignment: safe between two computes)."""
        self._mlps.update(mlps)
        self._plans = {}
        self.experts = sorted(self._mlps)

    def add(self, experts: Iterable[tuple[int, int]], reader: CheckpointReader) -> list[tuple[int, int]]:
        """Load and serve these experts; returns the ones that were not held before."""
        mlps = self.read(experts, reader)
        self.install(mlps)
        return sorted(mlps)

    def remove(self, experts: Iterable[tuple[int, int]]) -> None:
        """Free these experts (all must be held: raises NotFound naming the first that is not)."""
        keys = sorted(set((int(l), int(e)) for l, e in experts))
        for layer, expert in keys:
            if (layer, expert) not in self._mlps:
                raise NotFound("experts", f"(layer {layer}, expert {expert}) is not held here")
        for key in keys:
            del self._mlps[key]
        self._plans = {}
        self.experts = sorted(self._mlps)

    def _checked(self, layer: int, expert: int, hidden_states: torch.Tensor) -> SwiGLUMLP:
        if (layer, expert) not in self._mlps:
            raise NotFound("expert", f"(layer {layer}, expert {expert}) is not held here")
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.config.hidden_size:
            raise InvalidArgument("hidden_states", f"shape {list(hidden_states.shape)} is not "
                                                   f"[num_tokens, {self.config.hidden_size}]")
        return self._mlps[(layer, expert)]

    def compute(self, layer: int, expert: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """All tokens routed to one expert in one pass: [n, H] -> w2(silu(w1 x) * w3 x) [n, H] (unweighted)."""
        return self._checked(layer, expert, hidden_states)(hidden_states.to(self.device, self.dtype))

    def compute_many(self, groups: list[tuple[int, int, torch.Tensor]]) -> list[torch.Tensor]:
        """[compute(*group) for group in groups] (group: layer, expert, hidden_states [n_e, H]) over
        the process's compute threads (shardmesh.compute_pool): on the C kernel one call cuts every
        expert into pieces over them (SwiGLUMLP.many), the same bits as one by one; otherwise whole
        experts are dealt to the threads."""
        mlps = [self._checked(*group) for group in groups]
        inputs = [hidden_states.to(self.device, self.dtype) for _, _, hidden_states in groups]
        outputs = SwiGLUMLP.many(mlps, inputs, compute_pool.threads())
        if outputs is None:
            outputs = compute_pool.parallel_map(lambda pair: pair[0](pair[1]), list(zip(mlps, inputs)))
        return outputs

    def packed_plan(self, layer: int, experts: Sequence[int]) -> PackedPlan | None:
        """The modules (and the kernel, when one takes them all) of `experts` of `layer`, in that
        order; None when one of them is not held. Remembered per list until the experts held change."""
        key = (layer, tuple(experts))
        plan = self._plans.get(key)
        if plan is None:
            mlps = [self._mlps.get((layer, expert)) for expert in key[1]]
            if any(mlp is None for mlp in mlps):
                return None
            kernel = mlps[0].kernel if mlps else None
            if kernel is not None and any(mlp.kernel is not kernel for mlp in mlps):
                kernel = None
            table = kernels.ExpertTable([(mlp.gate_proj, mlp.up_proj, mlp.down_proj) for mlp in mlps]) \
                if kernel is not None else None
            plan = PackedPlan(key[1], mlps, kernel, table)
            if len(key[1]) <= self.config.num_experts:  # what stages send: each expert of a layer at most once
                if len(self._plans) >= MAX_PACKED_PLANS:
                    self._plans = {}
                self._plans[key] = plan
        return plan

    def compute_packed(self, layer: int, experts: Sequence[int], counts: list[int], hidden_states: torch.Tensor,
                       out: torch.Tensor, plan: PackedPlan | None = None, checked: bool = False) -> torch.Tensor:
        """compute_many over one packed tensor: hidden_states [N, H], its first counts[0] rows for
        experts[0], the next counts[1] for experts[1], ...; each row's output into the same row of
        `out` [N, H] (the dtype of `hidden_states`; rows of no expert are left as they are). Returns
        `out`. On the C kernel no tensor per expert is made (kernels.Kernel.expert_ffn_packed).
        `plan`: packed_plan(layer, experts), from a caller that has checked hidden_states [N, H].
        `checked`: that caller has also checked that hidden_states and `out` are contiguous CPU
        tensors of the shard's dtype and sum(counts) == N == out's rows (the expert server: its
        decoded request and claimed reply), so the kernel takes them without asking again."""
        if plan is None:
            plan = self.packed_plan(layer, experts)
            if plan is None:  # NotFound naming the first expert not held (or the shape, as one by one)
                for expert in experts:
                    self._checked(layer, expert, hidden_states)
            elif experts:  # the shape, which is the same for every expert: [n, H]
                self._checked(layer, experts[0], hidden_states)
        kernel = plan.kernel
        if kernel is not None and (checked or kernels.usable(hidden_states, out)
                                   and sum(counts) == hidden_states.shape[0] == out.shape[0]):
            kernel.expert_ffn_packed(hidden_states, plan.table, counts, compute_pool.threads(), out)
            return out
        if experts:  # torch (or another device): group by group, then into `out`
            groups = hidden_states.split_with_sizes(counts)
            out.copy_(torch.cat(self.compute_many([(layer, expert, x) for expert, x in zip(experts, groups)])))
        return out


class LocalExperts:
    """ExpertBackend over in-process shards; replicas of an expert are used in turn."""

    def __init__(self, shards: list[ExpertShard]):
        self.shards = list(shards)
        self._holders: dict[tuple[int, int], list[ExpertShard]] = {}
        for shard in self.shards:
            for key in shard.experts:
                self._holders.setdefault(key, []).append(shard)
        self._turn = 0
        self.tokens_routed: Counter[tuple[int, int, int]] = Counter()  # (layer, expert, shard index) -> tokens

    async def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """groups: expert id -> hidden_states [n_e, H]; returns expert id -> output [n_e, H]."""
        outputs = {}
        for expert, hidden_states in groups.items():
            holders = self._holders.get((layer, expert))
            if not holders:
                raise Unavailable("experts", f"no local shard holds (layer {layer}, expert {expert})")
            shard = holders[self._turn % len(holders)]
            self._turn += 1
            self.tokens_routed[(layer, expert, self.shards.index(shard))] += hidden_states.shape[0]
            outputs[expert] = shard.compute(layer, expert, hidden_states).to(hidden_states.device)
        return outputs
