"""RemoteExperts: the ExpertBackend a stage uses to reach expert servers over gRPC.

For each MoE layer it picks one replica per expert (the one with the fewest tokens in flight,
ties broken by a rotating offset), sends every group bound for one server in one message, and
awaits all servers concurrently."""

import asyncio
import dataclasses

import grpc
import torch

from shardmesh import codec
from shardmesh.errors import FailedPrecondition, RequestError, Unavailable
from shardmesh.grpc_util import insecure_channel
from shardmesh.v1 import expert_pb2, expert_pb2_grpc

EXPERT_CALL_DEADLINE_S = 30.0


@dataclasses.dataclass(frozen=True)
class Placement:
    version: int
    replicas: dict[tuple[int, int], tuple[str, ...]]  # (layer, expert) -> addresses


class RemoteExperts:
    def __init__(self):
        self.placement = Placement(0, {})
        self._stubs: dict[str, expert_pb2_grpc.ExpertStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._in_flight: dict[str, int] = {}  # address -> tokens sent and not yet answered
        self._turn = 0

    def update(self, placement: Placement) -> None:
        """Switch placement (between steps: the stage holds its step lock while calling this)."""
        self.placement = placement
        for address in {a for addresses in placement.replicas.values() for a in addresses}:
            if address not in self._stubs:
                self._channels[address] = insecure_channel(address)
                self._stubs[address] = expert_pb2_grpc.ExpertStub(self._channels[address])
                self._in_flight[address] = 0

    def _pick(self, layer: int, expert: int) -> str:
        addresses = self.placement.replicas.get((layer, expert))
        if not addresses:
            raise FailedPrecondition("placement", f"no expert server holds (layer {layer}, expert {expert})")
        self._turn += 1
        rotated = addresses[self._turn % len(addresses):] + addresses[:self._turn % len(addresses)]
        return min(rotated, key=lambda a: self._in_flight[a])

    async def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        by_server: dict[str, list[int]] = {}
        for expert, hidden_states in groups.items():
            address = self._pick(layer, expert)
            by_server.setdefault(address, []).append(expert)
            self._in_flight[address] += hidden_states.shape[0]
        calls = [self._call(address, layer, experts, groups) for address, experts in by_server.items()]
        outputs: dict[int, torch.Tensor] = {}
        for part in await asyncio.gather(*calls):
            outputs.update(part)
        return outputs

    async def _call(self, address: str, layer: int, experts: list[int], groups: dict[int, torch.Tensor]):
        request = expert_pb2.ComputeExpertsRequest(groups=[
            expert_pb2.ExpertGroup(layer=layer, expert=e, hidden_states=codec.encode(groups[e])) for e in experts])
        try:
            reply = await self._stubs[address].ComputeExperts(request, timeout=EXPERT_CALL_DEADLINE_S)
        except grpc.aio.AioRpcError as error:
            raise Unavailable("experts", f"expert server {address} failed layer {layer}: "
                                         f"{error.code().name} {error.details()}") from error
        finally:
            self._in_flight[address] -= sum(groups[e].shape[0] for e in experts)
        if len(reply.outputs) != len(experts):
            raise Unavailable("experts", f"expert server {address} answered {len(reply.outputs)} of {len(experts)} groups")
        outputs = {}
        for i, (expert, message) in enumerate(zip(experts, reply.outputs)):
            try:
                output = codec.decode(message, f"outputs[{i}]")
            except RequestError as error:
                raise Unavailable("experts", f"expert server {address} sent a bad tensor: {error}") from error
            if output.shape != groups[expert].shape or output.dtype != groups[expert].dtype:
                raise Unavailable("experts", f"expert server {address} answered {list(output.shape)} "
                                             f"{output.dtype} for {list(groups[expert].shape)} {groups[expert].dtype}")
            outputs[expert] = output
        return outputs

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
