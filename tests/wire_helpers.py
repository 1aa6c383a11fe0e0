"""What the security and limits tests share: one in-process mesh per test module on its own event
loop (like bad_input_harness), every RPC each port serves (read from the service descriptors, so
a new RPC is covered without editing a list), and raw calls that send arbitrary bytes."""

import asyncio
import dataclasses

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from shardmesh.local_mesh import LocalMesh, start_local_mesh
from shardmesh.v1 import admin_pb2, expert_pb2, router_pb2, stage_pb2

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
SERVICES_BY_PORT = {
    "router": [router_pb2.DESCRIPTOR.services_by_name["Router"], router_pb2.DESCRIPTOR.services_by_name["Registry"],
               admin_pb2.DESCRIPTOR.services_by_name["Admin"], HEALTH, REFLECTION],
    "stage": [stage_pb2.DESCRIPTOR.services_by_name["Stage"], HEALTH, REFLECTION],
    "expert": [expert_pb2.DESCRIPTOR.services_by_name["Expert"], HEALTH, REFLECTION],
}


@dataclasses.dataclass(frozen=True)
class Rpc:
    path: str                 # "/package.Service/Method"
    request_streaming: bool
    response_streaming: bool

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]  # "Service/Method"


def rpcs_of(port_kind: str) -> list[Rpc]:
    """Every RPC served on a port of `port_kind` ("router" | "stage" | "expert")."""
    return [Rpc(f"/{service.full_name}/{method.name}", method.client_streaming, method.server_streaming)
            for service in SERVICES_BY_PORT[port_kind] for method in service.methods]


async def raw_call(channel: grpc.aio.Channel, rpc: Rpc, payload: bytes, metadata=(),
                   timeout: float = 5.0) -> tuple[grpc.StatusCode, str, int]:
    """Send `payload` as the request's bytes (no serializer: nothing is parsed on our side);
    return (status code, details, number of responses received)."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    multicallable = kind[(rpc.request_streaming, rpc.response_streaming)](rpc.path)
    request = iter([payload]) if rpc.request_streaming else payload
    call = multicallable(request, timeout=timeout, metadata=metadata or None)
    responses = 0
    try:
        if rpc.response_streaming:
            async for _ in call:
                responses += 1
        else:
            await call
            responses = 1
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", responses
    return grpc.StatusCode.OK, "", responses


@dataclasses.dataclass
class ModuleMesh:
    """A mesh on an event loop of its own; `run` a coroutine on it."""
    loop: asyncio.AbstractEventLoop
    mesh: LocalMesh

    @classmethod
    def start(cls, model_dir, topology=None, **kwargs) -> "ModuleMesh":
        loop = asyncio.new_event_loop()
        try:
            mesh = loop.run_until_complete(start_local_mesh(model_dir, topology, **kwargs))
        except BaseException:
            loop.close()
            raise
        return cls(loop, mesh)

    def run(self, coroutine, timeout: float = 120.0):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    def stop(self) -> None:
        self.loop.run_until_complete(self.mesh.stop())
        self.loop.close()

    @property
    def address(self) -> str:
        return self.mesh.address

    def addresses(self) -> dict[str, list[str]]:
        """port kind -> addresses of the servers of that kind."""
        return {"router": [self.mesh.address],
                "stage": [f"127.0.0.1:{server.port}" for server in self.mesh.stages],
                "expert": [f"127.0.0.1:{server.port}" for server in self.mesh.experts]}
