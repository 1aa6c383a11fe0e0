"""Admin.RemoveServer (`shardmesh remove`): an expert server replica taken out for good. A live one
holding experts is drained first (its experts moved live while generations run: every one
completes with the tokens of the run before), then forgotten: gone from GetClusterStatus and the
placement, no longer probed, and its re-registrations refused. A dead one is removed without a
drain. Bad requests get a precise status naming the field, and change nothing."""

import asyncio
import dataclasses

import grpc
import pytest

from shardmesh import grpc_util
from shardmesh.client import AsyncClient
from shardmesh.service_config import ServiceConfig
from shardmesh.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from mesh_helpers import local_mesh
from placement_helpers import Generations, cluster_status, expert_held

from router.expert_health import FAILURES_TO_DOWN, PROBE_PERIOD_S

PROMPTS = [[1, 9, 27, 81], [5, 7, 11, 13, 17], [2, 200, 31]]
NEW_TOKENS = 10
INTERVAL_S = 0.2  # the replicas' re-registration period here (the services' default is 5 s)


async def remove(router: str, address: str) -> admin_pb2.RemoveServerResponse:
    async with grpc_util.insecure_channel(router) as channel:
        return await admin_pb2_grpc.AdminStub(channel).RemoveServer(
            admin_pb2.RemoveServerRequest(address=address), timeout=120)


async def start_replica(model_dir, router: str, replica_id: str):
    from expert_server.main import start_expert_server
    return await start_expert_server(ServiceConfig(model_dir=model_dir, name="experts-a", router_address=router,
                                                   replica_id=replica_id, reregister_interval_s=INTERVAL_S))


def experts_a(status: router_pb2.ClusterStatus) -> router_pb2.ServerStatus:
    return next(s for s in status.servers if s.name == "experts-a")


async def generate(address: str) -> list[list[int]]:
    async with AsyncClient(address, timeout=60) as client:
        async def one(prompt):
            return [t.token_id async for t in client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


def test_a_live_replica_is_drained_during_generations_then_forgotten(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir) as mesh:
            baseline = await generate(mesh.address)
            replica = await start_replica(mixtral_dir, mesh.address, "r2")
            try:
                address = replica.address
                assert address in experts_a(await cluster_status(mesh.address, load=False)).replica_addresses
                generations = Generations(mesh.address, PROMPTS, NEW_TOKENS)
                running = asyncio.create_task(generations.run())
                await generations.wait_first(2)
                reply = await remove(mesh.address, address)  # drains while the generations run
                results = await asyncio.wait_for(running, 120)
                assert [r.tokens for r in results] == baseline
                assert [r.indexes for r in results] == [list(range(NEW_TOKENS))] * len(PROMPTS)

                assert (reply.name, reply.replica_id, reply.drained) == ("experts-a", "r2", True)
                assert {(e.layer, e.expert) for d in reply.drain.dropped if d.address == address for e in d.experts} == \
                    set(mesh.router.state.cluster.topology.server("experts-a").experts)  # all it held
                assert not any(p.address == address for p in reply.drain.placement)  # planned empty
                assert await expert_held(address) == set()  # its experts were dropped on it
                status = await cluster_status(mesh.address, load=False)
                assert status.serving and address not in experts_a(status).replica_addresses
                assert status.placement_version >= reply.placement_version  # (a probe verdict may follow)
                placed = {a for loc in mesh.router.state.cluster.placement().locations for a in loc.addresses}
                assert address not in placed

                await asyncio.sleep(max(5 * INTERVAL_S, 2 * PROBE_PERIOD_S))  # it keeps re-registering: refused
                assert address not in experts_a(await cluster_status(mesh.address, load=False)).replica_addresses
                assert address not in mesh.router.state.expert_prober._probes  # no longer probed
                assert await generate(mesh.address) == baseline
            finally:
                await replica.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 240))


def test_a_dead_replica_is_removed_without_a_drain_and_may_not_register_again(mixtral_dir, capsys):
    """Through the command line, `shardmesh remove` (it blocks: run beside the mesh's event loop)."""
    from shardmesh.cli import main as shardmesh_main

    async def main():
        async with local_mesh(mixtral_dir) as mesh:
            replica = await start_replica(mixtral_dir, mesh.address, "r3")
            address = replica.address
            await replica.stop(grace=None)
            for _ in range(200):  # the probes find it dead: ~FAILURES_TO_DOWN probe periods
                if address in experts_a(await cluster_status(mesh.address, load=False)).unreachable_addresses:
                    break
                await asyncio.sleep(PROBE_PERIOD_S)
            else:
                pytest.fail(f"{address} not unreachable after {200 * PROBE_PERIOD_S:.0f} s "
                            f"({FAILURES_TO_DOWN} failed probes make it so)")
            assert await asyncio.to_thread(shardmesh_main, ["remove", "--router", mesh.address, address]) == 0
            out = capsys.readouterr().out
            assert f"removed experts-a replica 'r3' at {address}" in out and "placement:" not in out  # no drain
            assert await asyncio.to_thread(shardmesh_main, ["remove", "--router", mesh.address, address]) == 1
            assert f"NOT_FOUND: address: no expert server is registered at '{address}'" in capsys.readouterr().err
            status = await cluster_status(mesh.address, load=False)
            assert status.serving and address not in experts_a(status).replica_addresses
            assert address not in experts_a(status).unreachable_addresses

            again = dataclasses.replace(ServiceConfig(model_dir=mixtral_dir, name="experts-a"),
                                        router_address=mesh.address, replica_id="r3")
            from expert_server.main import start_expert_server
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await start_expert_server(again)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.details().startswith("replica_id:"), refused.value.details()
            assert "removed" in refused.value.details()

    asyncio.run(asyncio.wait_for(main(), 240))


def test_bad_removals_name_the_field_and_change_nothing(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir) as mesh:
            status = await cluster_status(mesh.address, load=False)
            addresses = {s.name: s.address for s in status.servers}
            cases = {"empty": ("", grpc.StatusCode.INVALID_ARGUMENT),
                     "unknown": ("127.0.0.1:1", grpc.StatusCode.NOT_FOUND),
                     "a name, not host:port": ("experts-a", grpc.StatusCode.NOT_FOUND),
                     "the last replica of its entry": (addresses["experts-b"], grpc.StatusCode.FAILED_PRECONDITION),
                     "a stage": (addresses["stage-0"], grpc.StatusCode.NOT_FOUND)}
            for case, (address, code) in cases.items():
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await remove(mesh.address, address)
                assert error.value.code() == code, (case, error.value.details())
                assert error.value.details().startswith("address:"), (case, error.value.details())
                after = await cluster_status(mesh.address, load=False)
                assert after.serving and after.placement_version == status.placement_version, case
                assert [s.replica_addresses for s in after.servers] == [s.replica_addresses for s in status.servers]

    asyncio.run(asyncio.wait_for(main(), 120))
