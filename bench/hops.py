"""Round trips of single hops to the echo servers (echo_servers.py), over gRPC bytes or shared memory,
made as the mesh makes them (RemoteExperts for stage -> expert, StageLink for router -> stage)."""

import contextlib
import functools
import json
import pathlib
import subprocess
import sys
import time

import torch

from shardmesh import codec, grpc_util
from shardmesh.nccl_dispatch import NcclLinks
from shardmesh.data_planes import DataPlanes
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, stage_pb2

PLANES = ("grpc", "shm")
EXPERT_PLANES = (*PLANES, "nccl")  # stage -> expert only: NCCL links (gloo point to point on the CPU)


@contextlib.contextmanager
def echo_servers(vocab_size: int, pids: list | None = None):
    """Start echo_servers.py in another process; yields {"expert" | "stage_hidden" | "stage_logits": address}
    (and appends the process id to `pids`, if given)."""
    process = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).with_name("echo_servers.py")),
                                "--vocab-size", str(vocab_size)], stdout=subprocess.PIPE, text=True)
    if pids is not None:
        pids.append(process.pid)
    try:
        ports = json.loads(process.stdout.readline())
        yield {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    finally:
        process.terminate()
        process.wait(10)


async def timed(call, rounds: int, warmup: int = 3) -> float:
    """Mean seconds of `await call()` over `rounds`, after `warmup` untimed calls."""
    for _ in range(warmup):
        await call()
    start = time.perf_counter()
    for _ in range(rounds):
        await call()
    return (time.perf_counter() - start) / rounds


async def expert_round_trip(address: str, plane: str, groups: dict[int, torch.Tensor], rounds: int) -> float:
    """One ComputeExperts carrying `groups` (expert -> [n, H]) and its outputs decoded, as RemoteExperts does."""
    async with grpc_util.insecure_channel(address) as channel:
        planes = DataPlanes(enabled=plane == "shm")
        stub = expert_pb2_grpc.ExpertStub(channel)
        link = await NcclLinks("cpu").get(address, channel, "bench") if plane == "nccl" else None

        def request(encode):
            return expert_pb2.ComputeExpertsRequest(groups=[
                expert_pb2.ExpertGroup(layer=0, expert=e, hidden_states=encode(x)) for e, x in groups.items()])

        async def call():
            if link is not None:
                async with link.call() as over_link:
                    reply = await over_link.invoke(stub.ComputeExperts, request(over_link.encode), 30)
                    return [over_link.decode(t, "outputs") for t in reply.outputs]
            shm = await planes.get(address, channel)
            if shm is not None:
                async with shm.session() as session:
                    reply = await session.invoke("shardmesh.v1.Expert/ComputeExperts", request(session.encode),
                                                 expert_pb2.ComputeExpertsResponse, 30)
                    return [session.decode(t, "outputs") for t in reply.outputs]
            reply = await stub.ComputeExperts(request(functools.partial(codec.encode, arena=None)), timeout=30)
            return [codec.decode(t, "outputs", segment=None) for t in reply.outputs]

        seconds = await timed(call, rounds)
        used = await planes.get(address, channel)
        assert (used is not None) == (plane == "shm"), f"{plane} asked, shared memory {'' if used else 'not '}used"
        await planes.close()
        return seconds


async def remote_experts_round_trip(address: str, plane: str, groups: dict[int, torch.Tensor], rounds: int) -> float:
    """One MoE layer's groups (expert -> [n, H]) through the stage's own RemoteExperts.run: the
    transport plus the stage's per-call work (spread over replicas, failover bookkeeping, metrics)."""
    from stage_server.remote_experts import Placement, RemoteExperts

    experts = RemoteExperts(data_plane=plane, flops_per_row=1.0)
    await experts.update(Placement(1, {(0, e): (address,) for e in groups}))
    try:
        return await timed(lambda: experts.run(0, groups), rounds)
    finally:
        await experts.close()


async def stage_round_trip(address: str, plane: str, batch: int, hidden_size: int, rounds: int) -> float:
    """One Step of `batch` single-token sequences with hidden_states [batch, H], as StageLink makes it."""
    from router.stage_link import StageLink

    planes = DataPlanes(enabled=plane == "shm")
    link = StageLink("echo", address, data_planes=planes)
    hidden = torch.zeros(batch, hidden_size)
    sequences = [stage_pb2.SequenceSlice(sequence_id=i + 1, start_position=16, num_tokens=1) for i in range(batch)]
    steps = iter(range(1, 1 << 30))

    async def call():
        output = await link.forward(next(steps), sequences, "hidden_states", hidden)
        if isinstance(output, tuple):  # (output, the sequences the stage refused)
            output = output[0]
        return output if isinstance(output, torch.Tensor) else codec.decode(output, "output", segment=None)

    seconds = await timed(call, rounds)
    await link.close()
    await planes.close()
    return seconds
