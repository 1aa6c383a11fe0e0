"""RemoteExperts' failover and placement switches against real expert servers in this process
(gRPC and shared memory on loopback): a piece whose server fails is re-sent to another replica in
the same call, a layer whose every replica is gone fails fast with UNAVAILABLE, and a placement
that drops a server closes its channel and its shared-memory session. The same with processes
killed by signals: test_expert_faults_processes.py."""

import asyncio
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
import torch

from shardmesh import grpc_util
from shardmesh.errors import Unavailable
from shardmesh.service_config import ServiceConfig
from shardmesh.v1 import router_pb2, router_pb2_grpc

from stage_server.remote_experts import FAST_FAILURE_OPTIONS, MAX_ATTEMPTS, Placement, RemoteExperts


def closed_port_address() -> str:
    """A loopback address where nothing listens (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


async def start_experts(model_dir, name: str, data_plane: str):
    from expert_server.main import start_expert_server
    return await start_expert_server(ServiceConfig(model_dir=model_dir, name=name, data_plane=data_plane))


def groups_for(layer_experts, rows: int = 40, hidden: int = 64) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {e: torch.randn(rows, hidden, generator=generator) for e in layer_experts}  # each [rows, H]


@pytest.mark.parametrize("data_plane", ["grpc", "shm"])
def test_failed_replica_pieces_go_to_the_live_one(mixtral_dir, data_plane):
    async def main():
        live = await start_experts(mixtral_dir, "experts-a", data_plane)  # experts 0..4 of every layer
        dead = closed_port_address()
        experts = RemoteExperts(data_plane=data_plane)
        experts.min_split_tokens = 8  # cut each group over both replicas: half of every group meets the dead one
        try:
            groups = groups_for([0, 1, 2, 3])
            await experts.update(Placement(1, {(0, e): (live.address,) for e in range(5)}))
            expected = await experts.run(0, groups)
            await experts.update(Placement(2, {(0, e): (dead, live.address) for e in range(5)}))
            started = time.monotonic()
            outputs = await experts.run(0, groups)
            elapsed = time.monotonic() - started
            assert experts.failovers > 0
            for e in groups:  # every row answered once, in order, by the live replica
                torch.testing.assert_close(outputs[e], expected[e], rtol=0, atol=0)
            # A refused connection fails over at once (bound: far below one call deadline, even at load ~10).
            assert elapsed < 3.0, elapsed
            # The dead replica is avoided from now on: no second failover.
            failovers = experts.failovers
            await experts.run(0, groups)
            assert experts.failovers == failovers

            # Every replica of an expert gone: UNAVAILABLE naming the layer and the server, after
            # MAX_ATTEMPTS rounds, quickly.
            await experts.update(Placement(3, {(0, e): (dead,) for e in range(5)}))
            started = time.monotonic()
            with pytest.raises(Unavailable, match=f"layer 0: no replica answered after {MAX_ATTEMPTS} attempts.*{dead}"):
                await experts.run(0, groups)
            assert time.monotonic() - started < 3.0
        finally:
            await experts.close()
            await live.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_placement_without_a_server_closes_its_channel_and_shared_memory(mixtral_dir):
    async def main():
        first = await start_experts(mixtral_dir, "experts-a", "shm")
        second = await start_experts(mixtral_dir, "experts-a", "shm")
        experts = RemoteExperts(data_plane="shm")
        try:
            both = {(0, e): (first.address, second.address) for e in range(5)}
            await experts.update(Placement(1, both))
            experts.min_split_tokens = 8
            await experts.run(0, groups_for([0, 1]))
            pool = experts.data_planes._channels.get(second.address)
            assert pool is not None, "the shared-memory plane was not negotiated with the second server"
            session = pool.sessions[0]
            channel = experts._channels[second.address]

            await experts.update(Placement(2, {(0, e): (first.address,) for e in range(5)}))
            assert experts.connected() == {first.address}
            assert second.address not in experts.data_planes._channels
            assert session.broken and session.stream.transport.is_closing()  # its socket closed, segment unmapped
            with pytest.raises(Exception):  # the gRPC channel is closed: no call goes out on it
                await channel.channel_ready()

            # Brought back: a fresh channel and session, and it computes again.
            await experts.update(Placement(3, both))
            assert experts.connected() == {first.address, second.address}
            before = second.servicer.tokens_computed
            await experts.run(0, groups_for([0, 1]))
            assert second.servicer.tokens_computed > before
        finally:
            await experts.close()
            await first.stop(grace=None)
            await second.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 60))


class AcceptingRegistry(router_pb2_grpc.RegistryServicer):
    async def RegisterServer(self, request, context):
        return router_pb2.RegisterServerResponse()


def test_frozen_server_is_found_by_keepalive_over_grpc(mixtral_dir):
    """SIGSTOP of an expert server process while a call waits on it: gRPC keepalive (a ping every
    second, 2 s for its ack) fails the call and its rows go to the other replica, long before the
    call's deadline (made huge here, so only keepalive can explain a quick failover)."""
    keepalive_bound = (FAST_FAILURE_OPTIONS["grpc.keepalive_time_ms"] + FAST_FAILURE_OPTIONS["grpc.keepalive_timeout_ms"]) / 1000
    registry = closed_port_address()  # the server's "router": accepts its registration (then it serves)
    frozen = closed_port_address()   # where it listens (free a moment ago)
    process = subprocess.Popen([sys.executable, "-m", "shardmesh.cli", "expert", "--model", str(mixtral_dir),
                                "--name", "experts-a", "--router", registry, "--data-plane", "grpc", "--threads", "1",
                                "--log-level", "ERROR", "--no-auth", "--port", frozen.rsplit(":", 1)[1]],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def main():
            accepting = grpc.aio.server()  # an expert server with a router serves once registered (expert_server/main.py)
            router_pb2_grpc.add_RegistryServicer_to_server(AcceptingRegistry(), accepting)
            accepting.add_insecure_port(registry)
            await accepting.start()
            await grpc_util.wait_for_health(frozen, timeout=60)
            live = await start_experts(mixtral_dir, "experts-a", "grpc")
            experts = RemoteExperts(data_plane="grpc", flops_per_row=1e10)  # deadline 5 s + 1 s a row: minutes
            experts.min_split_tokens = 8
            try:
                await experts.update(Placement(1, {(0, e): (frozen, live.address) for e in range(5)}))
                groups = groups_for([0, 1, 2, 3])
                expected = await experts.run(0, groups)  # both replicas answer: channels connected
                assert experts.failovers == 0
                process.send_signal(signal.SIGSTOP)
                started = time.monotonic()
                outputs = await experts.run(0, groups)
                elapsed = time.monotonic() - started
                print(f"frozen expert server failed over by keepalive after {elapsed:.2f} s")
                assert experts.failovers > 0
                for e in groups:
                    torch.testing.assert_close(outputs[e], expected[e], rtol=0, atol=0)
                # keepalive_bound plus scheduling at load ~10 (the deadline here is over a minute)
                assert elapsed < keepalive_bound + 5.0, elapsed
            finally:
                await experts.close()
                await live.stop(grace=None)
                await accepting.stop(None)

        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(timeout=10)
