"""An expert replica placed live (a rebalance gave it more experts than its topology entry names),
SIGKILLed while generations run and restarted at the same port as a real process (`shardmesh
expert`, as a container restart would): the generations that run meanwhile, before, during and
after its restart, all complete with the tokens of the fault-free run (checked against
transformers); the restarted process loads its live assignment before the router places it again
(expert_server/main.py, router ClusterMap.restarted_at), and then computes again (once the stages'
DOWN_RETRY_S for it has passed, if the router never dropped it from the placement).

Bounds hold on a 2-core machine at load average ~10: a process start there takes well under a
minute, and the waits below are several times that."""

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh import grpc_util
from shardmesh.client import AsyncClient, ShardmeshError
from shardmesh.launcher import Launcher
from shardmesh.reference import transformers_greedy
from shardmesh.v1 import admin_pb2, admin_pb2_grpc, expert_pb2, expert_pb2_grpc, router_pb2
from stage_server.remote_experts import DOWN_RETRY_S

from placement_helpers import cluster_status, expert_held, expert_tokens, target_by_address

pytestmark = pytest.mark.slow
PROMPTS = [[1, 9, 27, 81], [5, 7, 11, 13, 17], [2, 200, 31], [100, 50, 25, 12, 6, 3]]
NEW_TOKENS = 12
# Reconnect at once while the restarted process is not listening yet (gRPC's default backoff is 1 s+).
FAST_RECONNECT = {"grpc.initial_reconnect_backoff_ms": 5, "grpc.min_reconnect_backoff_ms": 5,
                  "grpc.max_reconnect_backoff_ms": 20}
START_BOUND_S = 90.0  # a replica process starts, loads, registers (load ~10: tens of seconds at worst)


async def generate(address: str) -> list[list[int] | ShardmeshError]:
    """PROMPTS at once, greedy: each one's tokens (indexes checked contiguous), or its error."""
    async with AsyncClient(address, timeout=120) as client:
        async def one(prompt):
            tokens, indexes = [], []
            try:
                async for token in client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True):
                    tokens.append(token.token_id)
                    indexes.append(token.index)
            except ShardmeshError as error:
                return error
            assert indexes == list(range(NEW_TOKENS)), indexes
            return tokens
        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


def experts_a(status: router_pb2.ClusterStatus) -> router_pb2.ServerStatus:
    return next(s for s in status.servers if s.name == "experts-a")


async def wait_placed(router: str, address: str, timeout: float) -> None:
    """Until `address` is a registered, reachable replica of experts-a and the mesh serves."""
    deadline = time.monotonic() + timeout
    while True:
        status = await cluster_status(router, load=False)
        server = experts_a(status)
        if status.serving and address in server.replica_addresses and address not in server.unreachable_addresses:
            return
        assert time.monotonic() < deadline, f"{address} not placed within {timeout:.0f} s: {status}"
        await asyncio.sleep(0.1)


async def held_when_first_serving(address: str, timeout: float) -> set[tuple[int, int]]:
    """Poll grpc.health.v1 on `address` every few ms until SERVING; then at once the experts it holds."""
    deadline = time.monotonic() + timeout
    async with grpc_util.open_channel(address, None, FAST_RECONNECT) as channel:
        health, expert = health_pb2_grpc.HealthStub(channel), expert_pb2_grpc.ExpertStub(channel)
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    info = await expert.GetExpertInfo(expert_pb2.GetExpertInfoRequest(), timeout=10)
                    return {(k.layer, k.expert) for k in info.experts}
            except grpc.aio.AioRpcError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"{address} not SERVING within {timeout:.0f} s"
            await asyncio.sleep(0.005)


def test_a_replica_placed_live_killed_and_restarted_at_its_port_loses_no_request(mixtral_dir):
    with Launcher(mixtral_dir, no_auth=True, log_level="INFO") as mesh:
        async def main():
            router = mesh.router_address
            baseline = await generate(router)
            for prompt, tokens in zip(PROMPTS, baseline):
                assert tokens == transformers_greedy(mixtral_dir, prompt, NEW_TOKENS, ignore_eos=True)

            replica = mesh.add_expert_replica("experts-a", "r2")
            status = await cluster_status(router, load=False)
            deadline = time.monotonic() + START_BOUND_S
            while len(experts_a(status).replica_addresses) < 2 or not status.serving:
                assert time.monotonic() < deadline and replica.poll() is None, mesh.log_tail("experts-a@r2")
                await asyncio.sleep(0.1)
                status = await cluster_status(router, load=False)
            (r2,) = set(experts_a(status).replica_addresses) - {experts_a(status).address}
            # Live: r2 holds every expert (its topology entry names experts 0..4); the others keep theirs.
            config = mesh.config
            every = {(l, e) for l in range(config.num_layers) for e in range(config.num_experts)}
            holdings = {s.address: {(k.layer, k.expert) for k in s.experts} for s in status.servers
                        if s.role == router_pb2.SERVER_ROLE_EXPERT}
            async with grpc_util.insecure_channel(router) as channel:
                reply = await admin_pb2_grpc.AdminStub(channel).Rebalance(
                    admin_pb2.RebalanceRequest(target=target_by_address(holdings | {r2: every})), timeout=120)
            assert reply.changed and reply.note == ""
            assert await expert_held(r2) == every

            rounds: list[list] = []
            restarted = asyncio.Event()

            async def load() -> None:  # generations back to back: before, during and after the restart
                while not restarted.is_set():
                    rounds.append(await generate(router))
                rounds.append(await generate(router))  # one more with the restarted replica placed

            generations = asyncio.create_task(load())
            await asyncio.sleep(0.5)
            replica.kill()  # SIGKILL, mid-generation
            replica.wait(timeout=10)
            restarted_process = mesh.add_expert_replica("experts-a", "r2", int(r2.rpartition(":")[2]))
            # From the first moment it says SERVING it holds its live assignment, not its topology entry.
            assert await held_when_first_serving(r2, START_BOUND_S) == every
            await wait_placed(router, r2, START_BOUND_S)
            assert restarted_process.poll() is None
            restarted.set()
            await asyncio.wait_for(generations, 240)

            # A stage that saw r2 fail avoids it for DOWN_RETRY_S unless a placement dropped and re-added
            # it meanwhile (a restart faster than the router's probes keeps it placed): generate on, a
            # bounded number of rounds, until the restarted process has computed again.
            deadline = time.monotonic() + DOWN_RETRY_S + START_BOUND_S
            while not sum((await expert_tokens(r2)).values()) and len(rounds) < 200:
                assert time.monotonic() < deadline, f"{r2} computed nothing in {len(rounds)} rounds after its restart"
                rounds.append(await generate(router))
            assert len(rounds) >= 2
            for i, results in enumerate(rounds):
                assert results == baseline, f"round {i} of {len(rounds)}: {results}"
            assert sum((await expert_tokens(r2)).values()) > 0  # the restarted process computes again
            assert "is told to hold its" in mesh.log_tail("router", 400)

        asyncio.run(asyncio.wait_for(main(), 480))
