"""NCCL on one GPU (marked `gpu`: skipped without CUDA). NCCL refuses two ranks of one communicator
on the same GPU ("Duplicate GPU detected", ncclInvalidUsage), so with the one GPU lent here:
- tensor parallelism: an NcclGroup of world size 1 (the stage's path: join_group(device="cuda:0"))
  all-reduces in place on the device;
- CuPy links: the real CupyCommunicator (unique id bytes -> CuPy's id, device pointers, the current
  stream) sends to itself inside one NCCL group;
- the two-process handshake with the real communicator (a server process on cuda:0 asked over
  gRPC to join as rank 1): it must either form (then NCCL allowed it) or fail fast with NCCL's
  invalid-usage error named in NcclJoinError, never hang; the outcome is printed.
Links of two ranks on two GPUs are covered by the fake-backend handshake test on the CPU only."""

import asyncio
import pathlib
import subprocess
import sys

import pytest
import torch

from shardmesh import grpc_util
from shardmesh.nccl_plane import CupyCommunicator, NcclJoinError, form_link
from shardmesh.tp_group import GlooGroup, NcclGroup
from shardmesh.tp_stage import join_group
from shardmesh.v1 import dataplane_pb2_grpc

pytestmark = pytest.mark.gpu
SERVER = pathlib.Path(__file__).resolve().parent / "ipc_echo_server.py"


def test_tp_group_on_cuda_is_nccl_and_all_reduces_on_the_device():
    async def main():
        store = GlooGroup.host_store(world_size=1, timeout_s=30)
        return await join_group(0, 1, f"127.0.0.1:{store.port}", 30, name="gpu-tp", store=store, device="cuda:0")

    group = asyncio.run(main())
    x = torch.arange(8, dtype=torch.bfloat16, device="cuda:0")
    out = group.all_reduce(x)
    torch.cuda.synchronize()
    assert isinstance(group, NcclGroup) and out.device == x.device and torch.equal(out.cpu(), torch.arange(8.0).bfloat16())


def test_cupy_communicator_sends_to_itself_on_the_device():
    pytest.importorskip("cupy")
    comm = CupyCommunicator(1, CupyCommunicator.unique_id(), 0, "cuda:0")
    source = torch.randn(1000, 64, device="cuda:0", dtype=torch.bfloat16)
    target = torch.zeros_like(source)
    comm.exchange(sends=[(source, 0)], recvs=[(target, 0)])
    torch.cuda.synchronize()
    assert torch.equal(target, source)


def test_two_processes_on_one_gpu_form_a_link_or_fail_fast_with_ncclinvalid_usage():
    pytest.importorskip("cupy")
    server = subprocess.Popen([sys.executable, str(SERVER), "cuda:0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("PORT "), line
        address = f"127.0.0.1:{line.split()[1]}"

        async def main():
            async with grpc_util.insecure_channel(address) as channel:
                try:
                    link = await form_link("gpu-test", [dataplane_pb2_grpc.DataPlaneStub(channel)], "cuda:0",
                                           join_timeout_s=60)
                    return "formed", link
                except NcclJoinError as error:
                    return "refused", error

        outcome, detail = asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        server.kill()
        server.wait()
    print(f"NCCL, two ranks on one GPU: {outcome}: {detail}")
    if outcome == "refused":
        assert "rank 1 did not join: UNAVAILABLE" in str(detail) and "invalid usage" in str(detail).lower(), detail
    else:
        assert detail.rank == 0
