"""The router's expert prober (router/expert_health.py) on loopback with real grpc.health.v1
servers: a replica that died is marked unreachable, and once it restarts at the same address and
registers again it stays in the placement, although the probe channel that watched it die still
waits out its reconnect backoff (a new server gets a new channel). Then it is watched as before:
dead again, it is dropped again."""

import asyncio
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from shardmesh.config import ModelConfig
from shardmesh.topology import Topology
from shardmesh.v1 import router_pb2

from router.cluster import ClusterMap
from router.expert_health import ExpertProber

PERIOD_S, DEADLINE_S, FAILURES = 0.1, 2.0, 3
# The dead replica's channel reconnects only after this (jitter: +-20 %): far longer than the
# FAILURES probes that would drop the restarted replica, so a prober still on that channel fails.
BACKOFF_MS = 10_000
BACKOFF = {"grpc.initial_reconnect_backoff_ms": BACKOFF_MS, "grpc.min_reconnect_backoff_ms": BACKOFF_MS,
           "grpc.max_reconnect_backoff_ms": BACKOFF_MS}
BOUND_S = 5.0  # a verdict on a loaded 2-core machine (FAILURES * PERIOD_S when idle)
MOE = ModelConfig(family="mixtral", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                  max_position_embeddings=64, tie_word_embeddings=False, num_experts=2, experts_per_token=1)
TOPOLOGY = '[[stage]]\nname = "s0"\nlayers = [0, 2]\n[[expert_server]]\nname = "experts-a"\nexperts = [0, 1]\n'


def register(cluster: ClusterMap, address: str) -> None:
    """experts-a at `address` registers (again, after a restart: ClusterMap.register takes it back)."""
    spec = cluster.topology.server("experts-a")
    cluster.register(router_pb2.RegisterServerRequest(
        name="experts-a", role=router_pb2.SERVER_ROLE_EXPERT, address=address, model_fingerprint=MOE.fingerprint,
        experts=[router_pb2.ExpertKey(layer=layer, expert=expert) for layer, expert in spec.experts]))


class RouterState:
    def __init__(self, cluster: ClusterMap):
        self.cluster, self.security = cluster, None
        self.registry_lock = asyncio.Lock()
        self.verdicts: list[bool] = []  # reachable? per cluster change the prober made

    async def on_cluster_change(self) -> None:
        self.verdicts.append(not self.cluster.unreachable)


async def health_server(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    return server


async def until(predicate, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"not within {timeout} s"
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_replica_restarted_at_its_address_is_not_dropped_by_the_channel_that_saw_it_die():
    async def body():
        port = free_port()
        address = f"127.0.0.1:{port}"
        cluster = ClusterMap(Topology.from_toml(TOPOLOGY, MOE.num_layers).validate(MOE), MOE)
        register(cluster, address)
        state = RouterState(cluster)
        prober = ExpertProber(state, period=PERIOD_S, deadline=DEADLINE_S, failures_to_down=FAILURES,
                              channel_options=BACKOFF).start()
        server = None
        try:
            # Nothing listens there (a replica that died): refused, then failing at once in backoff.
            await until(lambda: address in cluster.unreachable, BOUND_S)
            assert state.verdicts == [False]

            server = await health_server(port)  # restarted at the same address
            register(cluster, address)
            await asyncio.sleep(20 * PERIOD_S)  # well inside the old channel's backoff (>= 8 s)
            assert address not in cluster.unreachable, "the restarted replica was dropped again"
            assert state.verdicts == [False]

            await server.stop(None)  # and it is still watched: dead again, dropped again
            server = None
            await until(lambda: address in cluster.unreachable, BOUND_S)
            assert state.verdicts == [False, False]
        finally:
            await prober.stop()
            if server is not None:
                await server.stop(None)

    asyncio.run(body())

