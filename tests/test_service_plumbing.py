"""Every server serves grpc.health.v1 and reflection; a client that disconnects (its process
killed mid-stream) gets its sequence's KV freed on every stage."""

import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mesh_helpers import local_mesh
from test_mesh_features import cached_on_every_stage, wait_until


async def list_services(address: str) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in stub.ServerReflectionInfo(iter([request]), timeout=5):
            return {service.name for service in response.list_services_response.service}
    return set()


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=5)
        return reply.status


def test_every_server_serves_health_and_reflection(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir) as mesh:
            servers = {"shardmesh.v1.Router": mesh.address}
            servers.update({"shardmesh.v1.Stage": f"127.0.0.1:{s.port}" for s in mesh.stages[:1]})
            servers.update({"shardmesh.v1.Expert": f"127.0.0.1:{e.port}" for e in mesh.experts[:1]})
            found = {}
            for service, address in servers.items():
                found[service] = (await list_services(address), await health(address), await health(address, service))
            return found

    for service, (listed, overall, own) in asyncio.run(asyncio.wait_for(main(), 60)).items():
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
        assert overall == own == health_pb2.HealthCheckResponse.SERVING


CLIENT = """
import sys
from shardmesh.client import Client
with Client(sys.argv[1]) as client:
    for token in client.generate([1, 3, 5], max_new_tokens=400, ignore_eos=True):
        print(token.token_id, flush=True)
"""


def test_disconnected_client_frees_its_kv_everywhere(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir) as mesh:
            client = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, mesh.address,
                                                          stdout=asyncio.subprocess.PIPE)
            try:
                await asyncio.wait_for(client.stdout.readline(), 30)
                assert all(len(ids) == 1 for ids in await cached_on_every_stage(mesh))
            finally:
                client.kill()
                await client.wait()

            async def none_left():
                return all(ids == [] for ids in await cached_on_every_stage(mesh))
            await wait_until(none_left, timeout=5)

    asyncio.run(asyncio.wait_for(main(), 60))
