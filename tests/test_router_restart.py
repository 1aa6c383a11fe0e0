"""Servers keep registering (every `reregister_interval_s`), so a router that restarts gets its
servers back, and the live expert placement survives: the new router adopts each expert server's
own report of what it holds (no state file), numbers its placements after the stages' version,
and serves the same tokens with the moved experts still where the rebalance put them. An expert
server that restarts after a live placement change is told its assignment by the router and
loads it before it is placed again (it would otherwise come back holding its topology experts,
and the experts moved onto it would have no server)."""

import asyncio
import dataclasses

from shardmesh import grpc_util
from shardmesh.client import AsyncClient
from shardmesh.service_config import ServiceConfig
from shardmesh.tp_group import free_port

from placement_helpers import (SPARE_TOPOLOGY, cluster_status, expert_addresses, expert_held, expert_tokens,
                               rebalance, target_by_address)

INTERVAL_S = 0.2  # re-registration period in these tests (the services' default is 5 s)
PROMPTS = [[1, 5, 9, 13], [1, 64, 3, 128, 77, 9]]
NEW_TOKENS = 6
NUM_LAYERS = 4
MOVED = {(layer, expert) for layer in range(NUM_LAYERS) for expert in (4, 5)}  # experts-1 -> the empty experts-2


class Mesh:
    """Router, stages and expert servers of SPARE_TOPOLOGY in this process; the router on a fixed
    port so that a restarted one is found at the same address."""

    def __init__(self, model_dir):
        self.base = ServiceConfig(model_dir=model_dir, topology=SPARE_TOPOLOGY)
        self.address = f"127.0.0.1:{free_port()}"
        self.router, self.servers = None, {}

    def server_config(self, name: str) -> ServiceConfig:
        return dataclasses.replace(self.base, name=name, router_address=self.address, reregister_interval_s=INTERVAL_S)

    async def start_router(self) -> None:
        from router.main import start_router
        self.router = await start_router(dataclasses.replace(self.base, port=int(self.address.rpartition(":")[2])))

    async def start_server(self, name: str) -> None:
        from expert_server.main import start_expert_server
        from stage_server.main import start_stage_server
        start = start_stage_server if name.startswith("stage") else start_expert_server
        self.servers[name] = await start(self.server_config(name))

    async def __aenter__(self) -> "Mesh":
        await self.start_router()
        for spec in (*SPARE_TOPOLOGY.stages, *SPARE_TOPOLOGY.expert_servers):
            await self.start_server(spec.name)
        await grpc_util.wait_for_health(self.address, 60)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.router.stop(grace=None)
        for server in self.servers.values():
            await server.stop(grace=None)


async def generate(address: str) -> list[list[int]]:
    async with AsyncClient(address, timeout=60) as client:
        async def one(prompt):
            return [t.token_id async for t in client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


async def move_experts(mesh: Mesh) -> dict[str, str]:
    """Rebalance live: MOVED from experts-1 onto experts-2 (then their only server). Returns name -> address."""
    names = expert_addresses(await cluster_status(mesh.address, load=False))
    placement = {names["experts-0"]: {(l, e) for l in range(NUM_LAYERS) for e in range(4)},
                 names["experts-1"]: {(l, e) for l in range(NUM_LAYERS) for e in (6, 7)}, names["experts-2"]: MOVED}
    reply = await rebalance(mesh.address, target=target_by_address(placement))
    assert reply.changed and reply.note == ""
    assert await expert_held(names["experts-2"]) == MOVED
    return names


def held_by_name(status) -> dict[str, set]:
    return {s.name: {(k.layer, k.expert) for k in s.experts} for s in status.servers if s.experts or s.name == "experts-2"}


def test_a_restarted_router_gets_its_servers_and_the_live_placement_back(mixtral_dir):
    async def main():
        async with Mesh(mixtral_dir) as mesh:
            baseline = await generate(mesh.address)
            names = await move_experts(mesh)
            before = await cluster_status(mesh.address, load=False)
            await asyncio.sleep(3 * INTERVAL_S)  # re-registrations that change nothing are no-ops
            assert (await cluster_status(mesh.address, load=False)).placement_version == before.placement_version

            await mesh.router.stop(grace=None)
            await mesh.start_router()  # a fresh router: it knows only the topology
            await grpc_util.wait_for_health(mesh.address, 30)  # every server registered again
            after = await cluster_status(mesh.address, load=False)
            assert after.serving and expert_addresses(after) == names
            assert held_by_name(after)["experts-2"] == MOVED and held_by_name(after) == held_by_name(before)
            assert after.placement_version > before.placement_version  # stages accept it (not older than theirs)

            tokens_before = await expert_tokens(names["experts-2"])
            assert await generate(mesh.address) == baseline
            gained = {k: n - tokens_before.get(k, 0) for k, n in (await expert_tokens(names["experts-2"])).items()}
            assert set(gained) <= MOVED and sum(gained.values()) > 0  # the moved experts are still used there

    asyncio.run(main())


def test_an_expert_server_restarted_after_a_live_change_gets_its_assignment_again(mixtral_dir):
    async def main():
        async with Mesh(mixtral_dir) as mesh:
            baseline = await generate(mesh.address)
            names = await move_experts(mesh)
            version = (await cluster_status(mesh.address, load=False)).placement_version

            await mesh.servers["experts-2"].stop(grace=None)
            await mesh.start_server("experts-2")  # loads its topology entry (nothing), is told to hold MOVED
            restarted = f"127.0.0.1:{mesh.servers['experts-2'].port}"
            assert restarted != names["experts-2"] and await expert_held(restarted) == MOVED
            status = await cluster_status(mesh.address, load=False)
            assert expert_addresses(status)["experts-2"] == restarted and held_by_name(status)["experts-2"] == MOVED
            assert status.placement_version > version
            await grpc_util.wait_for_health(mesh.address, 30)
            assert await generate(mesh.address) == baseline
            assert sum((await expert_tokens(restarted)).values()) > 0

    asyncio.run(main())
