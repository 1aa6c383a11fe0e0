"""Dispatch and combine over NCCL links (`--data-plane nccl`, shardmesh/nccl_dispatch.py), run on the
CPU: the links are formed through DataPlane.JoinNcclGroup exactly as on GPUs, and the bytes move by
gloo point to point (nccl_plane.GlooCommunicator) in place of CuPy's NCCL. Covered: transformers'
tokens and logits through a mesh whose every stage -> expert tensor takes a link (in one process,
and with every service its own process), the link being re-formed after a failed call, and bad
link metadata or spans refused with a precise status while the server keeps serving. The CuPy
communicator on a GPU: tests/test_gpu_nccl.py."""

import asyncio

import grpc
import pytest
import torch

from shardmesh import codec, grpc_util
from shardmesh.errors import Unavailable
from shardmesh.launcher import Launcher
from shardmesh.nccl_dispatch import BYTES_KEY, GROUP_KEY, MAX_PAYLOAD_BYTES
from shardmesh.service_config import ServiceConfig
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2

from mesh_helpers import check_against_reference, generate_staggered, local_mesh, topology
from stage_server.remote_experts import Placement, RemoteExperts

PROMPTS = [[5, 17, 42, 9, 101, 3, 77], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [150, 2, 33]]
NEW_TOKENS = 6
HIDDEN = 64  # the mixtral_dir fixture's hidden size


def test_mesh_over_nccl_links_matches_transformers(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir, topology([(0, 2), (2, 4)], [[0, 1, 2, 3], [4, 5, 6, 7]]),
                              data_plane="nccl") as mesh:
            results = await generate_staggered(mesh.address, PROMPTS, NEW_TOKENS, join_after=1)
            links = [set(s.servicer.experts.nccl_links._links) for s in mesh.stages]
            planes = [s.servicer.experts.data_planes._channels for s in mesh.stages]
            return results, links, planes

    results, links, planes = asyncio.run(asyncio.wait_for(main(), 120))
    assert all(len(stage_links) == 2 for stage_links in links), links  # each stage linked to both servers
    assert not any(planes), planes  # and no shared-memory session carried anything
    check_against_reference(mixtral_dir, PROMPTS, results, NEW_TOKENS, "mixtral over nccl links (gloo)")


def test_processes_over_nccl_links(mixtral_dir, tmp_path):
    """Every service its own process (`shardmesh up`): the payloads cross process boundaries."""
    plane = ["--data-plane", "nccl"]
    args = {"router": plane, "stage": plane, "expert": plane}
    with Launcher(mixtral_dir, no_auth=True, log_level="INFO", service_args=args, ready_timeout=150) as mesh:
        results = asyncio.run(asyncio.wait_for(generate_staggered(mesh.router_address, PROMPTS, NEW_TOKENS), 120))
        logs = "".join(path.read_text(errors="replace") for path in sorted(mesh.workdir.glob("experts*.log")))
    assert "joined NCCL group" in logs, logs[-2000:]  # the stage linked with the expert server process
    check_against_reference(mixtral_dir, PROMPTS, results, NEW_TOKENS, "mixtral processes over nccl links (gloo)")


async def start_experts(model_dir):
    from expert_server.main import start_expert_server
    return await start_expert_server(ServiceConfig(model_dir=model_dir, name="experts-a", data_plane="nccl"))  # experts 0..4


def test_link_is_formed_again_after_a_failed_call(mixtral_dir):
    async def main():
        server = await start_experts(mixtral_dir)
        experts = RemoteExperts(data_plane="nccl")
        reference = RemoteExperts(data_plane="grpc")
        try:
            placement = Placement(1, {(0, e): (server.address,) for e in range(5)})
            await experts.update(placement)
            await reference.update(placement)
            groups = {e: torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(e)) for e in (1, 3)}
            first = await experts.run(0, groups)
            (group,) = experts.nccl_links._links.values()
            # A call the server refuses after taking the payload (it does not hold expert 7): the link is dropped...
            await experts.update(Placement(2, {**placement.replicas, (0, 7): (server.address,)}))
            with pytest.raises(Unavailable, match="expert 7"):
                await experts.run(0, {**groups, 7: groups[1]})
            assert not experts.nccl_links._links
            # ...and the next call forms a new one and gets the same answer, equal to gRPC bytes'.
            again = await experts.run(0, groups)
            (new_link,) = experts.nccl_links._links.values()
            assert new_link.group != group.group
            assert list(server.servicer.nccl.links) == [new_link.group]  # the server dropped the old one
            expected = await reference.run(0, groups)
            for e in groups:
                torch.testing.assert_close(first[e], expected[e], rtol=0, atol=0)
                torch.testing.assert_close(again[e], expected[e], rtol=0, atol=0)
        finally:
            await experts.close()
            await reference.close()
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_bad_link_metadata_and_spans_are_refused(mixtral_dir):
    async def main():
        server = await start_experts(mixtral_dir)
        try:
            async with grpc_util.insecure_channel(server.address) as channel:
                stub = expert_pb2_grpc.ExpertStub(channel)
                x = torch.randn(2, HIDDEN)

                async def call(tensor: tensor_pb2.Tensor, metadata=()):
                    request = expert_pb2.ComputeExpertsRequest(groups=[expert_pb2.ExpertGroup(
                        layer=0, expert=1, hidden_states=tensor)])
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        await stub.ComputeExperts(request, timeout=10, metadata=metadata)
                    return error.value.code(), error.value.details()

                span = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, HIDDEN],
                                         nccl=tensor_pb2.SharedMemorySpan(offset=0, length=2 * HIDDEN * 4))
                code, details = await call(span)  # a span without a link
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "groups[0].hidden_states.nccl" in details
                both = tensor_pb2.Tensor()
                both.CopyFrom(span)
                both.shm.length = span.nccl.length
                code, details = await call(both)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in details
                code, details = await call(codec.encode(x, arena=None), ((GROUP_KEY, "stage-0/experts/made-up"),
                                                                         (BYTES_KEY, "512")))
                assert code == grpc.StatusCode.NOT_FOUND and GROUP_KEY in details
                # The server's links are named by stages that joined them; a known link with a bad size:
                await server_link(channel)
                group = next(iter(server.servicer.nccl.links))
                for size in ("-1", "lots", str(MAX_PAYLOAD_BYTES + 1), None):
                    metadata = ((GROUP_KEY, group),) + (((BYTES_KEY, size),) if size is not None else ())
                    code, details = await call(codec.encode(x, arena=None), metadata)
                    assert code == grpc.StatusCode.INVALID_ARGUMENT and BYTES_KEY in details, (size, details)
                # Still serving, in gRPC bytes.
                reply = await stub.ComputeExperts(expert_pb2.ComputeExpertsRequest(groups=[expert_pb2.ExpertGroup(
                    layer=0, expert=1, hidden_states=codec.encode(x, arena=None))]), timeout=10)
                assert list(reply.outputs[0].shape) == [2, HIDDEN]
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


async def server_link(channel) -> None:
    """Form a link with the server behind `channel` as a stage would (this process is rank 0)."""
    from shardmesh.nccl_dispatch import NcclLinks
    await NcclLinks("cpu").get("server", channel, "test-stage")
