"""The router's watch over stage standbys (router/standby_health.py), on loopback with real
grpc.health.v1 servers: a standby that dies (its server stopped) or freezes (a socket that accepts
connections and answers nothing, as a SIGSTOPped process) is dropped from its stage within the
stated bound, a live one stays, the active server is not probed, a failover then skips the dead
standby, and a standby that registers again is watched again."""

import asyncio
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from shardmesh.topology import Topology

from router.cluster import ClusterMap
from router.standby_health import StandbyProber
from test_stage_standbys import DENSE, TOPOLOGY, register

PERIOD_S, DEADLINE_S, FAILURES = 0.05, 0.5, 3
# Dropped within FAILURES * (PERIOD_S + DEADLINE_S) (frozen) plus slack for a loaded machine
# (load average ~10: a probe's own loop may be late by a second or more).
DROP_BOUND_S = 10.0


class RouterState:
    """What the prober reads and calls of router.main.RouterState."""

    def __init__(self, cluster: ClusterMap):
        self.cluster, self.security = cluster, None
        self.registry_lock = asyncio.Lock()
        self.changes = 0

    async def on_cluster_change(self) -> None:
        self.changes += 1


async def health_server() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def until(predicate, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        assert loop.time() - start < timeout, f"not within {timeout} s"
        await asyncio.sleep(0.02)
    return loop.time() - start


def standbys(cluster: ClusterMap) -> list[str]:
    return cluster.servers["s1"].addresses[1:]


def test_dead_and_frozen_standbys_are_dropped_and_watched_again_after_registering():
    async def body():
        cluster = ClusterMap(Topology.from_toml(TOPOLOGY, DENSE.num_layers), DENSE)
        state = RouterState(cluster)
        (active, active_address), (live, live_address), (dying, dying_address) = [
            await health_server() for _ in range(3)]
        frozen = socket.socket()
        frozen.bind(("127.0.0.1", 0))
        frozen.listen()  # the kernel accepts connections; nothing ever answers
        frozen_address = f"127.0.0.1:{frozen.getsockname()[1]}"
        register(cluster, "s0", "127.0.0.1:1000")  # an active server: never probed (no server there)
        register(cluster, "s1", active_address)
        register(cluster, "s1", dying_address, "standby-1")
        register(cluster, "s1", live_address, "standby-2")
        prober = StandbyProber(state, period=PERIOD_S, deadline=DEADLINE_S, failures_to_down=FAILURES).start()
        try:
            await asyncio.sleep(10 * PERIOD_S)
            assert standbys(cluster) == [dying_address, live_address] and state.changes == 0
            assert set(prober._probes) == {dying_address, live_address}  # standbys only
            await dying.stop(None)
            dead_after = await until(lambda: dying_address not in standbys(cluster), DROP_BOUND_S)
            assert standbys(cluster) == [live_address] and state.changes == 1
            assert "s1" not in cluster.lost  # the stage still has servers
            # A failover of the active server now goes to the live standby, not the dead one.
            assert cluster.drop_replica("s1", active_address, "test: killed") == live_address
            register(cluster, "s1", active_address, "standby-1")  # a restarted server registers again
            register(cluster, "s1", frozen_address)  # the id the dropped active server had
            await until(lambda: frozen_address in prober._probes, DROP_BOUND_S)  # watched again
            frozen_after = await until(lambda: frozen_address not in standbys(cluster), DROP_BOUND_S)
            assert standbys(cluster) == [active_address] and state.changes == 2
            return dead_after, frozen_after
        finally:
            await prober.stop()
            frozen.close()
            for server in (active, live):
                await server.stop(None)

    dead_after, frozen_after = asyncio.run(body())
    assert frozen_after >= FAILURES * DEADLINE_S * 0.9, frozen_after  # it took the deadlines, not a refusal
