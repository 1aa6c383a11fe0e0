"""An expert server restarted at the address of one the router placed live (a rebalance gave it
experts its topology entry does not name) is not placed before it holds them: from its start
until the router records it holding its assignment it is NOT_SERVING on grpc.health.v1 (so the
router's health probes keep its address out of the placement, unreachable), and answers
ComputeExperts UNAVAILABLE (stages still sending to it fail those rows over to other replicas),
even though its gRPC port answers at once. Once it has loaded them it is placed again and the
tokens are those of the run before.

The restarted server's loading is held on an event here, so the window that is a few
milliseconds long in real life (a health probe of the router landing between the server's start
and its registration) is open for as long as the test looks at it."""

import asyncio
import dataclasses

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import expert_server.registration
from shardmesh import codec, grpc_util
from shardmesh.client import AsyncClient
from shardmesh.service_config import ServiceConfig
from shardmesh.tp_group import free_port
from shardmesh.v1 import expert_pb2, expert_pb2_grpc

from router.expert_health import FAILURES_TO_DOWN, PROBE_PERIOD_S
from placement_helpers import SPARE_TOPOLOGY, cluster_status, expert_held, rebalance, target_by_address

INTERVAL_S = 0.2  # re-registration period (the services' default is 5 s)
PROMPTS = [[1, 5, 9, 13], [1, 64, 3, 128, 77, 9]]
NEW_TOKENS = 6
NUM_LAYERS = 4
MOVED = {(layer, expert) for layer in range(NUM_LAYERS) for expert in (4, 5)}  # also placed on the empty experts-2


async def generate(address: str) -> list[list[int]]:
    async with AsyncClient(address, timeout=60) as client:
        async def one(prompt):
            return [t.token_id async for t in client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


async def health(address: str) -> int:
    async with grpc_util.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return reply.status


async def compute_code(address: str, hidden_size: int) -> grpc.StatusCode:
    """The status of a ComputeExperts call for one row of (layer 0, expert 4): one of MOVED."""
    import torch
    request = expert_pb2.ComputeExpertsRequest(groups=[expert_pb2.ExpertGroup(
        layer=0, expert=4, hidden_states=codec.encode(torch.zeros(1, hidden_size)))])
    async with grpc_util.insecure_channel(address) as channel:
        try:
            await expert_pb2_grpc.ExpertStub(channel).ComputeExperts(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_a_restarted_replica_is_placed_only_once_it_holds_its_assignment(mixtral_dir, monkeypatch):
    from expert_server.main import start_expert_server
    from router.main import start_router
    from stage_server.main import start_stage_server

    base = ServiceConfig(model_dir=mixtral_dir, topology=SPARE_TOPOLOGY)
    router_port, spare_port = free_port(), free_port()
    router_address, spare_address = f"127.0.0.1:{router_port}", f"127.0.0.1:{spare_port}"

    def config(name: str, port: int = 0) -> ServiceConfig:
        return dataclasses.replace(base, name=name, router_address=router_address, port=port,
                                   reregister_interval_s=INTERVAL_S)

    async def main():
        router = await start_router(dataclasses.replace(base, port=router_port))
        servers = [await start_stage_server(config(s.name)) for s in SPARE_TOPOLOGY.stages]
        servers += [await start_expert_server(config(n)) for n in ("experts-0", "experts-1")]
        spare = await start_expert_server(config("experts-2", spare_port))
        try:
            await grpc_util.wait_for_health(router_address, 60)
            baseline = await generate(router_address)
            addresses = {s.name: s.address for s in (await cluster_status(router_address, load=False)).servers}
            placement = {addresses["experts-0"]: {(l, e) for l in range(NUM_LAYERS) for e in range(4)},
                         addresses["experts-1"]: {(l, e) for l in range(NUM_LAYERS) for e in range(4, 8)},
                         spare_address: MOVED}  # MOVED on two servers: one left while experts-2 restarts
            assert (await rebalance(router_address, target=target_by_address(placement))).changed
            await spare.stop(grace=None)

            loading = asyncio.Event()
            hold = asyncio.Event()
            real_hold_exactly = expert_server.registration.hold_exactly

            async def held_hold_exactly(servicer, experts):
                loading.set()
                await hold.wait()  # the test looks at the window first
                await real_hold_exactly(servicer, experts)

            monkeypatch.setattr(expert_server.registration, "hold_exactly", held_hold_exactly)
            restart = asyncio.create_task(start_expert_server(config("experts-2", spare_port)))
            await asyncio.wait_for(loading.wait(), 60)  # it serves on its port and was told its assignment
            # Long enough for the router's probes to have seen it SERVING, had it said so.
            await asyncio.sleep((FAILURES_TO_DOWN + 1) * PROBE_PERIOD_S)
            assert await health(spare_address) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await compute_code(spare_address, base.model.hidden_size) == grpc.StatusCode.UNAVAILABLE
            status = await cluster_status(router_address, load=False)
            experts_2 = next(s for s in status.servers if s.name == "experts-2")
            assert spare_address in experts_2.unreachable_addresses
            placed = {a for loc in router.state.cluster.placement().locations for a in loc.addresses}
            assert spare_address not in placed and status.serving  # experts-1 holds MOVED meanwhile
            assert await generate(router_address) == baseline  # served without it

            hold.set()
            spare = await asyncio.wait_for(restart, 60)
            assert await expert_held(spare_address) == MOVED
            assert await health(spare_address) == health_pb2.HealthCheckResponse.SERVING
            status = await cluster_status(router_address, load=False)
            assert not next(s for s in status.servers if s.name == "experts-2").unreachable_addresses
            placed = {a for loc in router.state.cluster.placement().locations for a in loc.addresses}
            assert spare_address in placed
            assert await generate(router_address) == baseline
        finally:
            if "restart" in locals() and not restart.done():
                hold.set()
                spare = await restart
            await router.stop(grace=None)
            for server in (*servers, spare):
                await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 240))


def test_an_expert_server_without_a_router_serves_at_once(mixtral_dir):
    async def main():
        from expert_server.main import start_expert_server
        server = await start_expert_server(ServiceConfig(model_dir=mixtral_dir, name="experts-a"))
        try:
            assert await health(server.address) == health_pb2.HealthCheckResponse.SERVING
            assert server.servicer.unplaced_reason == ""
        finally:
            await server.stop(grace=None)

    asyncio.run(main())
