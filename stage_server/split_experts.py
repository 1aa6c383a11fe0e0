"""SplitExperts: the stage's ExpertBackend when some experts are split tensor-parallel over several
expert servers (the topology's [[split_expert]]; the math in shardmesh.split_expert).

Whole experts go through `RemoteExperts` (replicas, shared-memory plane) unchanged. The tokens of
a split expert go to every server holding one of its slices, all at once, each group tagged with
its slice (a server that does not hold exactly that slice answers NOT_FOUND: misrouting fails
loudly); the partial outputs are summed in slice order, then the MoE block combines as usual.

Shape legend: n tokens routed to one expert, H hidden_size.
"""

import asyncio

import grpc
import torch

from shardmesh import codec
from shardmesh.errors import RequestError, Unavailable
from shardmesh.grpc_util import open_channel
from shardmesh.split_expert import sum_slices
from shardmesh.v1 import expert_pb2, expert_pb2_grpc

from stage_server.remote_experts import EXPERT_CALL_DEADLINE_S, RemoteExperts

ExpertKey = tuple[int, int]


class SplitExperts:
    def __init__(self, inner: RemoteExperts, security=None):
        self.inner = inner                                 # whole experts
        self.security = security
        self.slices: dict[ExpertKey, tuple[str, ...]] = {}  # (layer, expert) -> address of slice 0, 1, ...
        self._stubs: dict[str, expert_pb2_grpc.ExpertStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def update(self, slices: dict[ExpertKey, tuple[str, ...]]) -> None:
        """Switch where the split experts' slices are (between steps, under the stage's step lock)."""
        self.slices = dict(slices)
        for address in {a for addresses in slices.values() for a in addresses}:
            if address not in self._stubs:
                self._channels[address] = open_channel(address, self.security)
                self._stubs[address] = expert_pb2_grpc.ExpertStub(self._channels[address])

    async def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """groups: expert id -> hidden_states [n_e, H]; returns expert id -> output [n_e, H]."""
        split = {e: x for e, x in groups.items() if (layer, e) in self.slices}
        if not split:
            return await self.inner.run(layer, groups)
        whole = {e: x for e, x in groups.items() if e not in split}
        by_server: dict[str, list[tuple[int, int]]] = {}  # address -> (expert, slice rank) it computes
        for expert in split:
            for rank, address in enumerate(self.slices[(layer, expert)]):
                by_server.setdefault(address, []).append((expert, rank))
        calls = [self._call(address, layer, parts, split) for address, parts in by_server.items()]
        *answers, outputs = await asyncio.gather(*calls, self.inner.run(layer, whole) if whole else _nothing())
        partials = dict(zip(by_server, answers))  # address -> expert -> partial [n_e, H]
        for expert in split:
            outputs[expert] = sum_slices([partials[a][expert] for a in self.slices[(layer, expert)]])
        return outputs

    async def _call(self, address: str, layer: int, parts: list[tuple[int, int]],
                    groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        count = {expert: len(self.slices[(layer, expert)]) for expert, _ in parts}
        request = expert_pb2.ComputeExpertsRequest(groups=[
            expert_pb2.ExpertGroup(layer=layer, expert=expert, hidden_states=codec.encode(groups[expert], arena=None),
                                   slice_rank=rank, slice_count=count[expert]) for expert, rank in parts])
        try:
            reply = await self._stubs[address].ComputeExperts(request, timeout=EXPERT_CALL_DEADLINE_S)
        except grpc.aio.AioRpcError as error:
            raise Unavailable("experts", f"expert server {address} failed a slice of layer {layer}: "
                                         f"{error.code().name} {error.details()}") from error
        if len(reply.outputs) != len(parts):
            raise Unavailable("experts", f"expert server {address} answered {len(reply.outputs)} of {len(parts)} slices")
        partials = {}
        for i, ((expert, _), message) in enumerate(zip(parts, reply.outputs)):
            try:
                output = codec.decode(message, f"outputs[{i}]", segment=None)
            except RequestError as error:
                raise Unavailable("experts", f"expert server {address} sent a bad tensor: {error}") from error
            if output.shape != groups[expert].shape or output.dtype != groups[expert].dtype:
                raise Unavailable("experts", f"expert server {address} answered {list(output.shape)} {output.dtype} "
                                             f"for {list(groups[expert].shape)} {groups[expert].dtype}")
            partials[expert] = output
        return partials

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


async def _nothing() -> dict[int, torch.Tensor]:
    return {}
