"""The CUDA IPC segment of the shared-memory plane, on the CPU: a fake IPC backend (buffers in one
process, looked up by handle) stands in for cudaIpcGetMemHandle / cudaIpcOpenMemHandle, with the
CPU as the segment's device, so the negotiation, the placement of tensors in `Tensor.cuda_ipc`,
views in place, the fallbacks and the bad input are all exercised here. The real CUDA path, two
processes on one GPU: tests/test_gpu_ipc.py."""

import asyncio
import secrets

import grpc
import pytest
import torch

from ipc_echo_server import DOUBLE, MARK, echo_server
from shardmesh import codec, grpc_util
from shardmesh.cuda_ipc import HANDLE_BYTES, CudaSegment
from shardmesh.errors import InvalidArgument
from shardmesh.data_planes import DataPlanes
from shardmesh.shm_frames import FRAME_VERSION
from shardmesh.shm_segment import Segment
from shardmesh.v1 import dataplane_pb2, expert_pb2, tensor_pb2
from shm_helpers import hello, raw_call


class FakeIpc:
    """Buffers of this process by handle; `open` of an unknown handle fails as CUDA would."""

    def __init__(self, opens: bool = True):
        self.buffers: dict[bytes, torch.Tensor] = {}
        self.opens = opens
        self.released: list[bytes] = []

    def allocate(self, size, device):
        handle = secrets.token_bytes(HANDLE_BYTES)
        self.buffers[handle] = torch.zeros(size, dtype=torch.uint8, device=device)
        return self.buffers[handle], handle, lambda: self.released.append(handle)

    def open(self, handle, size, device):
        if not self.opens or handle not in self.buffers:
            raise RuntimeError("cudaErrorInvalidResourceHandle")
        return self.buffers[handle][:size], lambda: None


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def request_of(encode, *tensors) -> expert_pb2.ComputeExpertsRequest:
    return expert_pb2.ComputeExpertsRequest(groups=[
        expert_pb2.ExpertGroup(layer=0, expert=i, hidden_states=encode(t)) for i, t in enumerate(tensors)])


async def double(planes: DataPlanes, address: str, *tensors):
    """(reply, outputs, the request's inputs as the client's segment now holds them, channel)."""
    async with grpc_util.insecure_channel(address) as grpc_channel:
        channel = await planes.get(address, grpc_channel)
        async with channel.session() as call:
            request = request_of(call.encode, *tensors)
            reply = await call.invoke(DOUBLE, request, expert_pb2.ComputeExpertsResponse, 5)
            outputs = [call.decode(out, f"outputs[{i}]") for i, out in enumerate(reply.outputs)]
            inputs = [call.decode(g.hidden_states, "input") for g in request.groups]
        return request, reply, outputs, inputs, call.channel  # the pool's session that carried the call


def test_tensors_move_through_the_device_segment_in_place():
    ipc = FakeIpc()

    async def main():
        async with echo_server(ipc_backend=ipc) as (_, doubler, address):
            planes = DataPlanes(enabled=True, ipc_backend=ipc)
            x, bf16 = torch.randn(37, 64), torch.randn(5, 8).to(torch.bfloat16)
            result = await double(planes, address, x, bf16)
            await planes.close()
            return doubler, x, bf16, *result

    doubler, x, bf16, request, reply, outputs, inputs, channel = run(main())
    assert channel.cuda is not None
    assert [g.hidden_states.HasField("cuda_ipc") for g in request.groups] == [True, True]
    assert all(out.HasField("cuda_ipc") and not out.HasField("shm") and not out.data for out in reply.outputs)
    assert doubler.inputs == [("cuda_ipc", "cpu"), ("cuda_ipc", "cpu")]
    assert torch.equal(outputs[0], x * 2) and torch.equal(outputs[1], bf16 * 2)
    assert [float(t.view(-1)[0]) for t in inputs] == [MARK, MARK], "the server's inputs were copies"
    assert len(ipc.released) == 1  # the client freed its device segment on close


def test_a_server_that_cannot_map_the_handle_keeps_the_session_on_host_memory():
    client_ipc, server_ipc = FakeIpc(), FakeIpc(opens=False)  # "another node": the handle does not open

    async def main():
        async with echo_server(ipc_backend=server_ipc) as (_, doubler, address):
            planes = DataPlanes(enabled=True, ipc_backend=client_ipc)
            x = torch.randn(4, 8)
            result = await double(planes, address, x)
            await planes.close()
            return doubler, x, *result

    doubler, x, request, reply, outputs, inputs, channel = run(main())
    assert channel.cuda is None and client_ipc.released  # offered, refused, freed at once
    assert doubler.inputs == [("shm", "cpu")] and reply.outputs[0].HasField("shm")
    assert torch.equal(outputs[0], x * 2)


def test_no_device_segment_is_made_for_a_server_that_does_not_offer_it():
    client_ipc = FakeIpc()

    async def main():
        async with echo_server() as (plane, doubler, address):  # a CPU server: cuda_ipc not offered
            offer = plane.offer()
            planes = DataPlanes(enabled=True, ipc_backend=client_ipc)
            result = await double(planes, address, torch.ones(2, 3))
            await planes.close()
            return offer, doubler, *result

    offer, doubler, _, _, outputs, _, channel = run(main())
    assert not offer.cuda_ipc and channel.cuda is None and not client_ipc.buffers
    assert doubler.inputs == [("shm", "cpu")] and torch.equal(outputs[0], torch.full((2, 3), 2.0))


def test_bad_device_segments_in_a_hello_leave_the_session_host_only_and_say_why():
    ipc = FakeIpc()

    async def main():
        async with echo_server(ipc_backend=ipc) as (plane, _, _):
            replies = {}
            for case, (handle, size) in {
                "short handle": (b"x" * 10, 4096),
                "unknown handle": (b"x" * HANDLE_BYTES, 4096),
                "size not aligned": (ipc.allocate(4096, torch.device("cpu"))[1], 4000),
                "size too large": (ipc.allocate(4096, torch.device("cpu"))[1], 1 << 40),
            }.items():
                segment = Segment.create(4096)
                offer = plane.offer()
                replies[case] = await hello(offer.shm_socket, dataplane_pb2.ShmHello(
                    session_key=offer.shm_session_key, segment=segment.name, segment_bytes=4096, probe=bytes(16),
                    cuda_ipc_handle=handle, cuda_segment_bytes=size, frame_version=FRAME_VERSION))
                segment.close()
            return replies

    replies = run(main())
    for case, reply in replies.items():
        assert reply.status_code == 0 and reply.probe == bytes(16) and not reply.cuda_probe, case
    assert replies["short handle"].status_details == "hello.cuda_ipc_handle: 10 bytes, not 64"
    assert replies["unknown handle"].status_details.startswith("hello.cuda_ipc_handle: does not open")
    assert replies["size not aligned"].status_details.startswith("hello.cuda_segment_bytes")
    assert replies["size too large"].status_details.startswith("hello.cuda_segment_bytes")


def cuda_span(offset: int, length: int, shape: list[int]) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape,
                             cuda_ipc=tensor_pb2.SharedMemorySpan(offset=offset, length=length))


BAD_CALLS = {  # (call header fields, the tensor sent, whether the session has a device segment) -> field named
    "cuda reply offset past the segment": (dict(cuda_reply_offset=1 << 40), None, True, "cuda_reply_offset"),
    "cuda reply offset without a segment": (dict(cuda_reply_offset=64), None, False, "cuda_reply_offset"),
    "span outside the device segment": ({}, cuda_span(1 << 30, 256, [1, 64]), True, "groups[0].hidden_states.cuda_ipc"),
    "span length vs shape": ({}, cuda_span(64, 128, [1, 64]), True, "groups[0].hidden_states.cuda_ipc.length"),
    "device span without a segment": ({}, cuda_span(64, 256, [1, 64]), False, "groups[0].hidden_states.cuda_ipc"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_device_spans_get_a_precise_status_and_the_session_goes_on(case):
    fields, tensor, with_segment, named = BAD_CALLS[case]
    ipc = FakeIpc()

    async def main():
        async with echo_server(ipc_backend=ipc) as (_, _, address):
            planes = DataPlanes(enabled=True, ipc_backend=ipc if with_segment else None)
            async with grpc_util.insecure_channel(address) as grpc_channel:
                channel = (await planes.get(address, grpc_channel)).sessions[0]  # driven by hand
                groups = [expert_pb2.ExpertGroup(hidden_states=tensor)] if tensor is not None else []
                reply = await raw_call(channel, DOUBLE, expert_pb2.ComputeExpertsRequest(groups=groups).SerializeToString(),
                                       1024, **fields)
                async with channel.session() as call:  # the same session still serves
                    good = await call.invoke(DOUBLE, request_of(call.encode, torch.ones(2, 3)),
                                             expert_pb2.ComputeExpertsResponse, 5)
                    good = call.decode(good.outputs[0], "outputs[0]")
            await planes.close()
            return channel, reply, good

    channel, reply, good = run(main())
    assert (channel.cuda is not None) == with_segment
    assert reply[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0], reply
    assert reply[1].decode().startswith(named + ":"), reply
    assert torch.equal(good, torch.full((2, 3), 2.0))


def test_device_spans_are_refused_in_ordinary_messages_and_with_shm_too():
    with pytest.raises(InvalidArgument) as ordinary:
        codec.decode(cuda_span(64, 256, [1, 64]), "groups[0].hidden_states")
    both = cuda_span(64, 256, [1, 64])
    both.shm.CopyFrom(tensor_pb2.SharedMemorySpan(offset=64, length=256))
    with pytest.raises(InvalidArgument) as twice:
        codec.decode(both, "x", segment=None, cuda_segment=None)
    assert ordinary.value.field == "groups[0].hidden_states.cuda_ipc"
    assert twice.value.field == "x.cuda_ipc"


def test_a_device_segment_views_and_writes_in_place():
    ipc = FakeIpc()
    segment = CudaSegment.create(1000, "cpu", ipc)  # rounded up to 1024
    peer = CudaSegment.attach(segment.handle, segment.size, "cpu", ipc)
    x = torch.arange(12, dtype=torch.float32).view(3, 4)
    segment.write(128, x)
    assert segment.size == 1024 and torch.equal(peer.view(128, 48, torch.float32, [3, 4], "t"), x)
    with pytest.raises(InvalidArgument, match="t.cuda_ipc"):
        peer.view(1000, 48, torch.float32, [3, 4], "t")
    peer.close()
    segment.close()
    segment.close()  # idempotent
    assert ipc.released == [segment.handle]
