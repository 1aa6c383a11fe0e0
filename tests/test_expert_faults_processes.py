"""Expert-side faults with every service its own process on loopback (shardmesh.launcher, as
`shardmesh up`), killed by real signals, on one mesh in order:

1. SIGKILL of an expert replica in the middle of 8 generations: all complete, tokens identical to
   the fault-free run (itself checked against transformers), indexes contiguous; the router drops
   the replica from the placement, takes it back when it restarts at the same address, and it
   computes again; SIGTERM (scale-down) drops it too.
2. SIGSTOP of a replica: the stages fail over by deadline/keepalive, the router drops it; SIGCONT
   brings it back.
3. SIGKILL of the last holders of experts 5..7: every stream ends UNAVAILABLE within 5 s, health
   NOT_SERVING, GetClusterStatus says what is missing, new requests are refused at once.

Bounds come from router/expert_health.py and stage_server/remote_experts.py; each is asserted with
room for a 2-core machine at load average ~10 (processes there wait for a core for well under a
second, so the slack below is several times what an idle machine needs)."""

import asyncio
import signal
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh import grpc_util
from shardmesh.client import AsyncClient, ShardmeshError, UnavailableError
from shardmesh.launcher import Launcher
from shardmesh.reference import transformers_greedy
from shardmesh.v1 import router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc

from router.expert_health import FAILURES_TO_DOWN, PROBE_DEADLINE_S, PROBE_PERIOD_S
from stage_server.remote_experts import EXPERT_CALL_BASE_S

pytestmark = pytest.mark.slow
PROMPTS = [[1, 9, 27, 81], [5, 7, 11, 13, 17], [2, 200, 31], [100, 50, 25, 12, 6, 3],
           [3, 1, 4, 1, 5, 9], [42, 17], [250, 128, 64, 32], [8, 16, 24, 32, 40]]
NEW_TOKENS = 24
SLACK_S = 8.0  # scheduling at load ~10, the placement push waiting for a step, the status polls
DEAD_BOUND_S = FAILURES_TO_DOWN * PROBE_PERIOD_S + SLACK_S
FROZEN_BOUND_S = FAILURES_TO_DOWN * (PROBE_PERIOD_S + PROBE_DEADLINE_S) + SLACK_S


class Stream:
    def __init__(self):
        self.tokens: list[int] = []
        self.indexes: list[int] = []
        self.arrivals: list[float] = []
        self.error: ShardmeshError | None = None
        self.ended = 0.0


async def generate(address: str, fault=None, after_tokens: int = 2) -> tuple[list[Stream], float]:
    """The 8 PROMPTS at once (greedy); `fault()` is called once every stream has `after_tokens`
    tokens. Returns the streams and when the fault happened (monotonic; 0 = no fault)."""
    streams = [Stream() for _ in PROMPTS]
    fault_at = 0.0
    async with AsyncClient(address, timeout=120) as client:
        async def one(stream: Stream, prompt: list[int]):
            nonlocal fault_at
            try:
                async for token in client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True):
                    stream.tokens.append(token.token_id)
                    stream.indexes.append(token.index)
                    stream.arrivals.append(time.monotonic())
                    if fault is not None and not fault_at and all(len(s.tokens) >= after_tokens for s in streams):
                        fault_at = time.monotonic()
                        fault()
            except ShardmeshError as error:
                stream.error = error
            stream.ended = time.monotonic()

        await asyncio.gather(*(one(s, p) for s, p in zip(streams, PROMPTS)))
    return streams, fault_at


def check_identical(streams: list[Stream], baseline: list[list[int]], context: str) -> None:
    for i, (stream, expected) in enumerate(zip(streams, baseline, strict=True)):
        assert stream.error is None, f"{context}: prompt {i} failed: {stream.error}"
        assert stream.indexes == list(range(NEW_TOKENS)), f"{context}: prompt {i} indexes {stream.indexes}"
        assert stream.tokens == expected, f"{context}: prompt {i}"


async def cluster_status(address: str, load: bool = False) -> router_pb2.ClusterStatus:
    async with grpc_util.insecure_channel(address) as channel:
        return await router_pb2_grpc.RouterStub(channel).GetClusterStatus(
            router_pb2.GetClusterStatusRequest(include_expert_load=load), timeout=30)


def server(status: router_pb2.ClusterStatus, name: str) -> router_pb2.ServerStatus:
    return next(s for s in status.servers if s.name == name)


async def wait_status(address: str, predicate, timeout: float, what: str) -> router_pb2.ClusterStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = await cluster_status(address)
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"not {what} within {timeout:.1f} s: {status}"
        await asyncio.sleep(0.1)


async def stage_placement_versions(status: router_pb2.ClusterStatus) -> list[int]:
    versions = []
    for stage in (s for s in status.servers if s.role == router_pb2.SERVER_ROLE_STAGE):
        async with grpc_util.insecure_channel(stage.address) as channel:
            info = await stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
        versions.append(info.placement_version)
    return versions


def stage_logs(mesh: Launcher) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(mesh.workdir.glob("stage-*.log")))


async def add_replica(mesh: Launcher, name: str, replica_id: str, port: int = 0):
    """Start a replica of `name` and wait until the router places it; (process, its address)."""
    def placed(status) -> set[str]:
        return set(server(status, name).replica_addresses) - set(server(status, name).unreachable_addresses)

    before = placed(await cluster_status(mesh.router_address))
    process = mesh.add_expert_replica(name, replica_id, port)
    status = await wait_status(mesh.router_address, lambda s: s.serving and placed(s) - before, 90,
                               f"{name}@{replica_id} placed")
    (address,) = placed(status) - before
    return process, address


@pytest.fixture(scope="module")
def mesh(mixtral_dir):
    with Launcher(mixtral_dir, no_auth=True, log_level="WARNING") as launcher:
        yield launcher  # on the way out every process is stopped (SIGTERM, then SIGKILL) and reaped


@pytest.fixture(scope="module")
def baseline(mesh, mixtral_dir) -> list[list[int]]:
    """The fault-free tokens, each identical to transformers' greedy generation."""
    streams, _ = asyncio.run(generate(mesh.router_address))
    tokens = [s.tokens for s in streams]
    for prompt, generated in zip(PROMPTS, tokens):
        assert generated == transformers_greedy(mixtral_dir, prompt, NEW_TOKENS, ignore_eos=True)
    return tokens


def test_killed_replica_fails_over_leaves_and_comes_back(mesh, baseline):
    async def main():
        address = mesh.router_address
        replica, replica_address = await add_replica(mesh, "experts-a", "r2")  # experts 0..4, like experts-a
        check_identical((await generate(address))[0], baseline, "two replicas of experts-a")

        streams, killed_at = await generate(address, fault=replica.kill)  # SIGKILL mid-generation
        check_identical(streams, baseline, "experts-a@r2 killed")
        assert "go to other replicas" in stage_logs(mesh)  # a step met the dead replica and re-sent its rows
        replica.wait(timeout=10)

        status = await wait_status(address, lambda s: replica_address in server(s, "experts-a").unreachable_addresses,
                                   DEAD_BOUND_S, "the killed replica out of the placement")
        print(f"killed replica out of the placement {time.monotonic() - killed_at:.2f} s after SIGKILL")
        assert status.serving and not status.unservable  # experts-a's first replica holds all it held
        assert await stage_placement_versions(status) == [status.placement_version] * 2  # pushed to every stage

        # Restarted at the same address: back in the placement, and it computes again.
        port = int(replica_address.rsplit(":", 1)[1])
        restarted, again = await add_replica(mesh, "experts-a", "r2", port)
        assert again == replica_address
        check_identical((await generate(address))[0], baseline, "experts-a@r2 restarted")
        load = await cluster_status(address, load=True)
        assert [s.tokens for s in load.expert_servers if s.address == replica_address][0] > 0

        # Scale-down: SIGTERM ends it cleanly and it leaves the placement; nothing is lost.
        restarted.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        await wait_status(address, lambda s: replica_address in server(s, "experts-a").unreachable_addresses,
                          DEAD_BOUND_S, "the stopped replica out of the placement")
        print(f"stopped replica out of the placement {time.monotonic() - stopped_at:.2f} s after SIGTERM")
        assert restarted.wait(timeout=15) == 0
        check_identical((await generate(address))[0], baseline, "experts-a@r2 scaled down")

    asyncio.run(asyncio.wait_for(main(), 240))


def test_frozen_replica_is_treated_as_dead_until_it_thaws(mesh, baseline):
    async def main():
        address = mesh.router_address
        replica, replica_address = await add_replica(mesh, "experts-b", "r2")  # experts 4..7 and 0, like experts-b
        try:
            streams, frozen_at = await generate(address, fault=lambda: replica.send_signal(signal.SIGSTOP))
            check_identical(streams, baseline, "experts-b@r2 frozen")
            # A step waiting on the frozen replica gives up on it within a call deadline (shared
            # memory; over gRPC keepalive is sooner) and re-sends its rows: the streams stall no longer.
            stall = max(b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:]))
            print(f"longest gap between two tokens with a frozen replica: {stall:.2f} s")
            assert stall < EXPERT_CALL_BASE_S + 1.0 + SLACK_S
            await wait_status(address, lambda s: replica_address in server(s, "experts-b").unreachable_addresses,
                              FROZEN_BOUND_S, "the frozen replica out of the placement")
            print(f"frozen replica out of the placement {time.monotonic() - frozen_at:.2f} s after SIGSTOP")
        finally:
            replica.send_signal(signal.SIGCONT)
        thawed_at = time.monotonic()
        await wait_status(address, lambda s: replica_address in server(s, "experts-b").replica_addresses
                          and replica_address not in server(s, "experts-b").unreachable_addresses,
                          PROBE_PERIOD_S + SLACK_S, "the thawed replica back in the placement")
        print(f"thawed replica back {time.monotonic() - thawed_at:.2f} s after SIGCONT")
        assert replica.poll() is None
        check_identical((await generate(address))[0], baseline, "experts-b@r2 thawed")

    asyncio.run(asyncio.wait_for(main(), 240))


def test_last_holders_killed_streams_end_unavailable_and_requests_are_refused(mesh, baseline):
    async def main():
        address = mesh.router_address
        holders = [p for name, p in mesh.processes.items() if name.split("@")[0] == "experts-b" and p.poll() is None]
        assert holders, "experts-b has no live process"

        def kill_all():
            for process in holders:
                process.kill()

        streams, killed_at = await generate(address, fault=kill_all)
        for i, stream in enumerate(streams):
            assert isinstance(stream.error, UnavailableError), f"prompt {i}: {stream.error!r} after {len(stream.tokens)}"
            assert stream.ended - killed_at < 5.0, f"prompt {i} ended {stream.ended - killed_at:.2f} s after the kill"
            assert stream.indexes == list(range(len(stream.tokens))) and stream.tokens == baseline[i][:len(stream.tokens)]
        print(f"every stream UNAVAILABLE within {max(s.ended for s in streams) - killed_at:.2f} s of the kill")
        for process in holders:
            process.wait(timeout=10)

        status = await wait_status(address, lambda s: not s.serving, DEAD_BOUND_S, "NOT serving")
        reasons = " ".join(status.unservable)
        assert "(layer 0, expert 5)" in reasons and "experts-b" in reasons, reasons
        async with grpc_util.insecure_channel(address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING

        async with AsyncClient(address, timeout=30) as client:
            started = time.monotonic()
            with pytest.raises(UnavailableError, match=r"\(layer 0, expert 5\)"):
                await client.generate_all(PROMPTS[0], max_new_tokens=4, ignore_eos=True)
            assert time.monotonic() - started < 2.0  # refused at once, not after a step times out

    asyncio.run(asyncio.wait_for(main(), 120))
