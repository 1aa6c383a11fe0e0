"""Helpers for fault tests with real processes: a `shardmesh up` mesh (shardmesh.launcher, every
service its own process on loopback) whose processes the test signals by pid, and streams that
record what reached the client and when."""

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh.client import AsyncClient, ShardmeshError
from shardmesh.launcher import Launcher
from shardmesh.v1 import stage_pb2, stage_pb2_grpc


@contextlib.contextmanager
def launched_mesh(model_dir: pathlib.Path, tmp_path: pathlib.Path, topology_toml: str, router_args=()):
    """Start every service of `topology_toml` as a process (no auth; standbys too); yield the
    Launcher (its `processes`: name -> Popen). On the way out every process stopped by the test
    is continued, then all are stopped and reaped (Launcher.stop: SIGTERM, SIGKILL after 10 s)."""
    topology = tmp_path / "topology.toml"
    topology.write_text(topology_toml)
    launcher = Launcher(model_dir, topology, no_auth=True, service_args={"router": list(router_args)},
                        ready_timeout=150)
    try:
        launcher.start()
        yield launcher
    finally:
        for process in launcher.processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        launcher.stop()
        assert all(p.poll() is not None for p in launcher.processes.values())


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on (Linux /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in pathlib.Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def pid_at(launcher: Launcher, address: str) -> int:
    """The pid of the launcher's process listening on host:port `address`."""
    port = int(address.rpartition(":")[2])
    pids = [p.pid for p in launcher.processes.values() if p.poll() is None and port in listening_ports(p.pid)]
    assert len(pids) == 1, (address, pids)
    return pids[0]


@dataclasses.dataclass
class StreamResult:
    tokens: list[int] = dataclasses.field(default_factory=list)
    indexes: list[int] = dataclasses.field(default_factory=list)
    error: ShardmeshError | None = None
    ended_at: float = 0.0  # time.monotonic() when the stream ended (tokens or error)


async def run_stream(client: AsyncClient, prompt: list[int], max_new_tokens: int, started: asyncio.Event | None = None,
                     **kwargs) -> StreamResult:
    """One Generate stream to the end; `started` is set at its first token. Errors are recorded."""
    result = StreamResult()
    try:
        async with client.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True, **kwargs) as stream:
            async for token in stream:
                result.tokens.append(token.token_id)
                result.indexes.append(token.index)
                if started is not None:
                    started.set()
    except ShardmeshError as error:
        result.error = error
    result.ended_at = time.monotonic()
    if started is not None:
        started.set()
    return result


async def faulted_run(client: AsyncClient, prompts: list[list[int]], new_tokens: int, fault) -> tuple[list, float]:
    """Start every prompt; once each has its first token, call `fault()`; return the streams'
    results and the time.monotonic() of the fault."""
    started = [asyncio.Event() for _ in prompts]
    tasks = [asyncio.create_task(run_stream(client, p, new_tokens, e)) for p, e in zip(prompts, started)]
    await asyncio.gather(*(e.wait() for e in started))
    fault_time = time.monotonic()
    fault()
    return await asyncio.gather(*tasks), fault_time


async def stage_info(address: str) -> stage_pb2.StageInfo:
    async with grpc.aio.insecure_channel(address) as channel:
        return await stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)


async def health_status(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


async def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Poll the async `predicate` until it returns something truthy (returned) or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)
