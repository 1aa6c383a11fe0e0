"""The last server of a layer range stops while the mesh is idle: the router notices from its
broken Step stream (no request needed), turns NOT_SERVING naming the layers, refuses requests at
once; a new server of those layers registers and the mesh serves again, with the same tokens.
In-process mesh over real gRPC (gRPC data plane: its Step streams stay open between requests)."""

import asyncio
import time

import pytest
from grpc_health.v1 import health_pb2

from shardmesh.client import AsyncClient, UnavailableError
from shardmesh.service_config import ServiceConfig

from fault_helpers import health_status, wait_for
from mesh_helpers import local_mesh, topology

# The stopped server's stream breaks at once; the probe of router/failover.py is refused at once.
# 5 s is the bound, and holds at load ~10 where this takes well under a second.
NOTICED_WITHIN_S = 5.0


def test_idle_last_holder_stops_then_a_new_one_registers(llama_dir):
    async def main():
        from stage_server.main import start_stage_server

        topo = topology([(0, 2), (2, 4)])
        async with local_mesh(llama_dir, topo, data_plane="grpc") as mesh:
            async with AsyncClient(mesh.address, timeout=60) as client:
                before = (await client.generate_all([1, 5, 9, 13], max_new_tokens=8, ignore_eos=True)).token_ids
                stage = mesh.stages.pop(1)
                stopped = time.monotonic()
                await stage.stop(grace=None)

                async def not_serving():
                    return await health_status(mesh.address) == health_pb2.HealthCheckResponse.NOT_SERVING
                assert await wait_for(not_serving, NOTICED_WITHIN_S)
                assert time.monotonic() - stopped < NOTICED_WITHIN_S
                status = await client.cluster_status()
                assert not status.serving
                assert [r for r in status.unservable if "stage 'stage-1' (layers [2, 4)) has no live server" in r]
                with pytest.raises(UnavailableError, match="stage-1"):
                    await client.generate_all([1, 5, 9, 13], max_new_tokens=8)

                config = ServiceConfig(model_dir=llama_dir, topology=topo, name="stage-1", data_plane="grpc",
                                       router_address=mesh.address)
                mesh.stages.append(await start_stage_server(config))

                async def serving():
                    return (await client.cluster_status()).serving
                assert await wait_for(serving, 30)
                assert await health_status(mesh.address) == health_pb2.HealthCheckResponse.SERVING
                again = (await client.generate_all([1, 5, 9, 13], max_new_tokens=8, ignore_eos=True)).token_ids
                assert again == before

    asyncio.run(asyncio.wait_for(main(), 90))
