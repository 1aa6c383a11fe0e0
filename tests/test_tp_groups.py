"""Shard servers of a TP stage choose their AllReduce per group from the host identities they
advertise over the control plane (StageInfo.host_id): shared memory when all share a host, gloo
otherwise, both == one whole stage. The join timeout is not the collective timeout: a shard that
cannot join makes the stage NOT_SERVING, with the reason, within the join timeout; a shard lost
later (its server stopped) fails the next step with UNAVAILABLE at once and turns the stage
NOT_SERVING with the reason."""

import asyncio
import pathlib
import socket
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oracle import assert_logits_close
from shardmesh import codec
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.service_config import ServiceConfig
from shardmesh.shm_allreduce import ShmGroup, host_id
from shardmesh.stage_model import StageBatch, StageModel
from shardmesh.topology import StageSpec, Topology
from shardmesh.tp_group import free_port
from shardmesh.v1 import stage_pb2, stage_pb2_grpc
from stage_server.main import start_stage_server

PROMPT = [5, 9, 17, 3, 40]


def shard_configs(model_dir, host_ids: list[str], **timeouts) -> list[ServiceConfig]:
    topology = Topology((StageSpec("stage-0", 0, 4, len(host_ids)),))
    rendezvous = f"127.0.0.1:{free_port()}"
    return [ServiceConfig(model_dir=model_dir, name=name, topology=topology, tp_rendezvous=rendezvous,
                          host_id=host, **timeouts) for name, host in zip(topology.stages[0].shard_names(), host_ids)]


def step_request(step_id: int, sequence_id: int, tokens: list[int], start: int = 0) -> stage_pb2.StepRequest:
    return stage_pb2.StepRequest(step_id=step_id, sequences=[stage_pb2.SequenceSlice(
        sequence_id=sequence_id, start_position=start, num_tokens=len(tokens))], token_ids=codec.encode(torch.tensor(tokens)))


async def step(channel, request: stage_pb2.StepRequest) -> torch.Tensor:
    call = stage_pb2_grpc.StageStub(channel).Step(iter([request]), timeout=30)
    replies = [reply async for reply in call]
    return codec.decode(replies[0].logits).clone()


async def health(channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def info(channel) -> stage_pb2.StageInfo:
    return await stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=5)


@pytest.mark.parametrize("hosts, expected", [("same", "shm"), ("different", "gloo")])
def test_the_group_chooses_shared_memory_only_when_every_shard_shares_the_host(llama_dir, hosts, expected):
    if expected == "shm" and not ShmGroup.supported():
        expected = "gloo"  # not x86-64 or no /dev/shm: gloo everywhere (the choice is still made)
    here = host_id()
    assert here, "this host must have an identity (boot id and /dev/shm)"
    host_ids = [here, here] if hosts == "same" else [here, "another-host/1/2"]
    whole = asyncio.run(StageModel(ModelConfig.from_dir(llama_dir), 0, 4, CheckpointReader(llama_dir)).forward(
        StageBatch([1], [0], [len(PROMPT)], torch.tensor(PROMPT)), None))

    async def main():
        servers = await asyncio.gather(*(start_stage_server(c) for c in shard_configs(llama_dir, host_ids)))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{servers[0].port}") as channel:
                infos = [await info(channel)]
                async with grpc.aio.insecure_channel(f"127.0.0.1:{servers[1].port}") as other:
                    infos.append(await info(other))
                return infos, await step(channel, step_request(1, 1, PROMPT))
        finally:
            for server in servers:
                await server.stop(grace=None)

    infos, logits = asyncio.run(asyncio.wait_for(main(), 120))
    assert [i.tp_all_reduce for i in infos] == [expected, expected]
    assert [i.host_id for i in infos] == host_ids and not any(i.not_serving_reason for i in infos)
    assert_logits_close(logits, whole, context=f"tp=2 over {expected} vs one whole stage")


def test_a_shard_that_cannot_join_fails_within_the_join_timeout_not_the_collective_timeout(llama_dir):
    rank0 = shard_configs(llama_dir, ["h", "h"], tp_join_timeout=1.5, tp_collective_timeout=600)[0]

    async def main():
        started = time.monotonic()
        server = await start_stage_server(rank0)  # its rank 1 is never started
        elapsed = time.monotonic() - started
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                return elapsed, await health(channel), await info(channel)
        finally:
            await server.stop(grace=None)

    elapsed, status, stage_info = asyncio.run(asyncio.wait_for(main(), 60))
    # 1.5 s join timeout; 15 s leaves room for a loaded machine (load average ~10), far below 600 s.
    assert elapsed < 15, elapsed
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "could not join the group" in stage_info.not_serving_reason
    assert "within 1.5 s" in stage_info.not_serving_reason and stage_info.tp_all_reduce == ""


@pytest.mark.parametrize("hosts", ["same", "different"])
def test_a_shard_lost_after_joining_fails_the_next_step_at_once_and_the_stage_stops_serving(llama_dir, hosts):
    here = host_id()
    host_ids = [here, here] if hosts == "same" else [here, "another-host/1/2"]
    configs = shard_configs(llama_dir, host_ids, tp_join_timeout=60, tp_collective_timeout=300)

    async def main():
        servers = await asyncio.gather(*(start_stage_server(c) for c in configs))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{servers[0].port}") as channel:
                await step(channel, step_request(1, 1, PROMPT))
                assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
                await servers[1].stop(grace=None)  # the shard goes away
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await step(channel, step_request(2, 1, [7], start=len(PROMPT)))
                elapsed = time.monotonic() - started
                await asyncio.sleep(0.1)  # the health update is scheduled from the failing step
                return caught.value, elapsed, await health(channel), await info(channel)
        finally:
            await servers[0].stop(grace=None)

    error, elapsed, status, stage_info = asyncio.run(asyncio.wait_for(main(), 120))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "tp" in error.details(), error.details()
    assert elapsed < 20, elapsed  # not the 300 s collective timeout (20 s: room for a loaded machine)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert stage_info.not_serving_reason, "the stage must say why it stopped serving"


def test_free_port_below_the_ephemeral_range_and_never_twice():
    """free_port: a port an outgoing connection cannot take meanwhile (below the OS's ephemeral range),
    bindable, and never handed out twice in a process (a test takes a dozen before starting anything)."""
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(10000 <= port < low for port in ports), ports
    with socket.socket() as server:
        server.bind(("127.0.0.1", ports[0]))
