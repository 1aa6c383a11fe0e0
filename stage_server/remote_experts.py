"""RemoteExperts: the ExpertBackend a stage uses to reach expert servers over gRPC.

For each MoE layer it spreads each expert's tokens over its replicas by least outstanding work
(tokens in flight; a big group is cut into chunks, see replica_spread.py), sends every group bound
for one server in one message, and awaits all servers concurrently."""

import asyncio
import dataclasses
import functools
import time

import grpc
import torch

from shardmesh import codec
from shardmesh.errors import FailedPrecondition, RequestError, Unavailable
from shardmesh.grpc_util import open_channel
from shardmesh.shm_plane import DataPlaneError, DataPlanes
from shardmesh.telemetry import metrics, tracing
from shardmesh.v1 import expert_pb2, expert_pb2_grpc

from stage_server.replica_spread import spread

EXPERT_CALL_DEADLINE_S = 30.0
EXPERT_METHOD = "shardmesh.v1.Expert/ComputeExperts"
MIN_SPLIT_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class Placement:
    version: int
    replicas: dict[tuple[int, int], tuple[str, ...]]  # (layer, expert) -> addresses


class RemoteExperts:
    def __init__(self, security=None, data_plane: str = "grpc"):
        self.security = security  # shardmesh.security.Security of the outgoing channels
        # Expert servers on this host are called over shared memory when they offer it.
        self.data_planes = DataPlanes(enabled=data_plane == "shm")
        self.placement = Placement(0, {})
        self._stubs: dict[str, expert_pb2_grpc.ExpertStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._in_flight: dict[str, int] = {}  # address -> tokens sent and not yet answered
        self._turn = 0
        self.min_split_tokens = MIN_SPLIT_TOKENS  # a group is cut over replicas only into chunks this big
        self.server_name = "stage"  # the stage's name, for metrics (set by its servicer)

    def update(self, placement: Placement) -> None:
        """Switch placement (between steps: the stage holds its step lock while calling this)."""
        self.placement = placement
        for address in {a for addresses in placement.replicas.values() for a in addresses}:
            if address not in self._stubs:
                self._channels[address] = open_channel(address, self.security)
                self._stubs[address] = expert_pb2_grpc.ExpertStub(self._channels[address])
                self._in_flight[address] = 0

    async def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        # A hot expert's rows may be cut into chunks over its replicas (replica_spread.py).
        by_server: dict[str, dict[int, torch.Tensor]] = {}  # address -> expert -> its chunk [n_chunk, H]
        chunks: dict[int, list[str]] = {}                   # expert -> addresses of its chunks, in row order
        for expert, hidden_states in groups.items():
            start = 0
            for address, count in self._spread(layer, expert, hidden_states.shape[0]):
                by_server.setdefault(address, {})[expert] = hidden_states[start:start + count]
                chunks.setdefault(expert, []).append(address)
                self._in_flight[address] += count
                start += count
        with tracing.span("moe.dispatch", layer=layer):  # a no-op context unless tracing is on
            calls = [self._call(address, layer, list(parts), parts) for address, parts in by_server.items()]
            answers = dict(zip(by_server, await asyncio.gather(*calls)))
        with tracing.span("moe.combine", layer=layer):
            return {expert: answers[addresses[0]][expert] if len(addresses) == 1
                    else torch.cat([answers[a][expert] for a in addresses]) for expert, addresses in chunks.items()}

    def _spread(self, layer: int, expert: int, num_tokens: int) -> list[tuple[str, int]]:
        addresses = self.placement.replicas.get((layer, expert))
        if not addresses:
            raise FailedPrecondition("placement", f"no expert server holds (layer {layer}, expert {expert})")
        self._turn += 1
        return spread(num_tokens, addresses, self._in_flight, self.min_split_tokens, self._turn)

    async def _call(self, address: str, layer: int, experts: list[int], groups: dict[int, torch.Tensor]):
        def request(encode) -> expert_pb2.ComputeExpertsRequest:
            return expert_pb2.ComputeExpertsRequest(groups=[
                expert_pb2.ExpertGroup(layer=layer, expert=e, hidden_states=encode(groups[e])) for e in experts],
                traceparent=tracing.current_traceparent())

        started = time.perf_counter()
        try:
            shm = await self.data_planes.get(address, self._channels[address])
            if shm is not None:
                async with shm.session() as call:  # tensors through shared memory
                    reply = await call.invoke(EXPERT_METHOD, request(call.encode), expert_pb2.ComputeExpertsResponse,
                                              EXPERT_CALL_DEADLINE_S)
                    return self._outputs(address, experts, groups, reply, call.decode)
            reply = await self._stubs[address].ComputeExperts(request(functools.partial(codec.encode, arena=None)),
                                                              timeout=EXPERT_CALL_DEADLINE_S)
            return self._outputs(address, experts, groups, reply, functools.partial(codec.decode, segment=None))
        except grpc.aio.AioRpcError as error:
            raise Unavailable("experts", f"expert server {address} failed layer {layer}: "
                                         f"{error.code().name} {error.details()}") from error
        except DataPlaneError as error:
            raise Unavailable("experts", f"expert server {address} failed layer {layer}: {error}") from error
        finally:
            self._in_flight[address] -= sum(groups[e].shape[0] for e in experts)
            nbytes = sum(metrics.tensor_bytes(groups[e]) for e in experts)  # answers are the same size
            metrics.data_plane_call(self.server_name, "stage_expert", address, started, nbytes, nbytes)

    def _outputs(self, address: str, experts: list[int], groups: dict[int, torch.Tensor],
                 reply: expert_pb2.ComputeExpertsResponse, decode) -> dict[int, torch.Tensor]:
        if len(reply.outputs) != len(experts):
            raise Unavailable("experts", f"expert server {address} answered {len(reply.outputs)} of {len(experts)} groups")
        outputs = {}
        for i, (expert, message) in enumerate(zip(experts, reply.outputs)):
            try:
                output = decode(message, f"outputs[{i}]")
            except RequestError as error:
                raise Unavailable("experts", f"expert server {address} sent a bad tensor: {error}") from error
            if output.shape != groups[expert].shape or output.dtype != groups[expert].dtype:
                raise Unavailable("experts", f"expert server {address} answered {list(output.shape)} "
                                             f"{output.dtype} for {list(groups[expert].shape)} {groups[expert].dtype}")
            outputs[expert] = output
        return outputs

    async def close(self) -> None:
        await self.data_planes.close()
        for channel in self._channels.values():
            await channel.close()
