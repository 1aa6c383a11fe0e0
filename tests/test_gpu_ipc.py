"""The CUDA IPC data plane between two processes on one GPU (marked `gpu`: skipped without CUDA or
CuPy). The server (tests/ipc_echo_server.py) runs as its own process on cuda:0; this process is
the client on cuda:0: the request's tensors and the reply's must lie in the device segment
(`Tensor.cuda_ipc`, no host copy), the server's inputs must be views of it (its in-place mark is
seen here), and the results exact. In one process, CUDA refuses to open its own handle: the plane
falls back to host shared memory and still answers. A whole mesh as processes on cuda:0 (fp32):
every stage's expert sessions use CUDA IPC, and its greedy tokens match the CPU oracle."""

import asyncio
import pathlib
import subprocess
import sys

import pytest
import torch

from ipc_echo_server import DOUBLE, MARK, echo_server
from mesh_helpers import check_against_reference, generate_staggered
from shardmesh import grpc_util
from shardmesh.data_planes import DataPlanes
from shardmesh.v1 import expert_pb2

pytestmark = pytest.mark.gpu
SERVER = pathlib.Path(__file__).resolve().parent / "ipc_echo_server.py"


@pytest.fixture(autouse=True)
def needs_cupy():
    pytest.importorskip("cupy")


async def double_on(address: str, planes: DataPlanes, tensors: list[torch.Tensor]):
    async with grpc_util.insecure_channel(address) as grpc_channel:
        channel = await planes.get(address, grpc_channel)
        async with channel.session() as call:
            request = expert_pb2.ComputeExpertsRequest(groups=[
                expert_pb2.ExpertGroup(layer=0, expert=i, hidden_states=call.encode(t)) for i, t in enumerate(tensors)])
            reply = await call.invoke(DOUBLE, request, expert_pb2.ComputeExpertsResponse, 30)
            outputs = [call.decode(out, f"outputs[{i}]") for i, out in enumerate(reply.outputs)]
            marks = [float(call.decode(g.hidden_states, "input").view(-1)[0]) for g in request.groups]
        return call.channel.cuda is not None, request, reply, outputs, marks


def test_two_processes_on_one_gpu_exchange_device_tensors_in_place():
    server = subprocess.Popen([sys.executable, str(SERVER), "cuda:0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        line = server.stdout.readline()  # "PORT n" once serving (CUDA and CuPy initialized: a few s)
        assert line.startswith("PORT "), line
        address = f"127.0.0.1:{line.split()[1]}"
        tensors = [torch.randn(37, 4096, device="cuda:0", dtype=torch.bfloat16),
                   torch.randn(5, 64, device="cuda:0")]

        async def main():
            planes = DataPlanes(enabled=True, device="cuda:0")
            try:
                return await double_on(address, planes, tensors)
            finally:
                await planes.close()

        mapped, request, reply, outputs, marks = asyncio.run(asyncio.wait_for(main(), 60))
        server.stdin.close()
        report = server.stdout.read()
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert mapped, "the server did not map the CUDA IPC segment"
    assert all(g.hidden_states.HasField("cuda_ipc") for g in request.groups)
    assert all(out.HasField("cuda_ipc") and not out.data for out in reply.outputs)
    assert "('cuda_ipc', 'cuda:0'), ('cuda_ipc', 'cuda:0')" in report, report
    assert marks == [MARK, MARK], "the server's inputs were copies, not views of the device segment"
    for output, tensor in zip(outputs, tensors):
        assert output.device == tensor.device and torch.equal(output, tensor * 2)


def test_in_one_process_the_plane_falls_back_to_host_memory():
    async def main():
        async with echo_server("cuda:0") as (_, doubler, address):
            planes = DataPlanes(enabled=True, device="cuda:0")
            try:
                return doubler, await double_on(address, planes, [torch.ones(3, 8, device="cuda:0")])
            finally:
                await planes.close()

    doubler, (mapped, _, reply, outputs, _) = asyncio.run(asyncio.wait_for(main(), 60))
    assert not mapped and doubler.inputs == [("shm", "cpu")] and reply.outputs[0].HasField("shm")
    assert torch.equal(outputs[0], torch.full((3, 8), 2.0))


def test_a_mesh_of_processes_on_one_gpu_moves_expert_traffic_by_cuda_ipc(mixtral_dir):
    from shardmesh.launcher import Launcher

    prompts = [[1, 17, 33, 5, 90, 61, 7], [1, 44], [1, 8, 120, 3, 3, 77, 19, 4, 90, 11, 60]]
    with Launcher(mixtral_dir, device="cuda:0", dtype="float32", no_auth=True, log_level="INFO",
                  ready_timeout=120) as launcher:
        results = asyncio.run(asyncio.wait_for(generate_staggered(launcher.router_address, prompts, 8), 120))
        logs = {spec.name: (launcher.workdir / f"{spec.name}.log").read_text(errors="replace")
                for spec in launcher.topology.stages}
    for name, log in logs.items():  # every stage calls expert servers, each session with a device segment
        assert "and a CUDA IPC segment" in log and "no CUDA IPC segment" not in log, f"{name}:\n{log[-3000:]}"
    check_against_reference(mixtral_dir, prompts, results, 8, "processes on cuda:0 with CUDA IPC, fp32")
