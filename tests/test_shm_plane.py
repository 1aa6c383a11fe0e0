"""The shared-memory data plane on its own: negotiation, round trips in place, fallbacks, bad
input answered with precise statuses (the server serving on), and no segment left behind."""

import asyncio
import contextlib

import grpc
import pytest
import torch
import uvloop

from shardmesh import codec, grpc_util
from shardmesh.errors import InvalidArgument
from shardmesh.grpc_util import translate_errors
from shardmesh.data_planes import DataPlanes
from shardmesh.shm_frames import CALL_FRAME, FRAME_VERSION, HEADER, MAX_FRAME_BYTES, REPLY_FRAME
from shardmesh.shm_plane import DataPlaneError, ShmChannel
from shardmesh.shm_segment import SHM_DIR, Segment
from shardmesh.shm_server import SERVICE_NAME, DataPlaneServicer, Method, ShmPlaneServer
from shardmesh.v1 import dataplane_pb2, dataplane_pb2_grpc, expert_pb2, tensor_pb2

from shm_helpers import hello, raw_call

DOUBLE = "test.Echo/Double"
REFUSE = "test.Echo/Refuse"


class Doubler:
    """A servicer method: every group's hidden_states times two; notes where its tensors lived, and
    then marks its input in place (-7 at [0, 0]): the client sees that mark only if the input was
    a view of the shared segment."""

    def __init__(self):
        self.inputs_in_shm: list[bool] = []

    async def Double(self, request, context):
        outputs = []
        for i, group in enumerate(request.groups):
            self.inputs_in_shm.append(group.hidden_states.HasField("shm"))
            hidden_states = codec.decode(group.hidden_states, f"groups[{i}].hidden_states")
            outputs.append(codec.encode(hidden_states * 2))
            if group.hidden_states.HasField("shm"):
                hidden_states.view(-1)[0] = -7.0
        return expert_pb2.ComputeExpertsResponse(outputs=outputs)

    @translate_errors
    async def Refuse(self, request, context):
        raise InvalidArgument("groups[0].expert", "no such expert here")


@contextlib.asynccontextmanager
async def plane_server(enabled: bool = True):
    doubler = Doubler()
    plane = ShmPlaneServer("test", {DOUBLE: Method(expert_pb2.ComputeExpertsRequest, doubler.Double),
                                    REFUSE: Method(expert_pb2.ComputeExpertsRequest, doubler.Refuse)})
    await plane.start()
    running = await grpc_util.start_server(DataPlaneServicer(plane if enabled else None),
                                           dataplane_pb2_grpc.add_DataPlaneServicer_to_server, SERVICE_NAME,
                                           "127.0.0.1", 0)
    channel = grpc_util.insecure_channel(running.address)
    try:
        yield plane, doubler, channel, running.address
    finally:
        await channel.close()
        await running.stop(None)
        await plane.stop()


def request_of(call_encode, *tensors) -> expert_pb2.ComputeExpertsRequest:
    return expert_pb2.ComputeExpertsRequest(groups=[
        expert_pb2.ExpertGroup(layer=0, expert=i, hidden_states=call_encode(t)) for i, t in enumerate(tensors)])


def our_segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob("shardmesh-*")}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # services run uvloop (it refuses abstract socket names)
def test_round_trip_in_place_and_nothing_left_in_dev_shm(loop):
    before = our_segments()

    async def main():
        async with plane_server() as (plane, doubler, channel, address):
            planes = DataPlanes(enabled=True)
            shm = await planes.get(address, channel)
            assert shm is not None and our_segments() == before  # unlinked once mapped
            x = torch.randn(37, 64)
            bf16 = torch.randn(5, 8).to(torch.bfloat16)
            async with shm.session() as call:
                request = request_of(call.encode, x, bf16)
                reply = await call.invoke(DOUBLE, request, expert_pb2.ComputeExpertsResponse, 5)
                assert all(out.HasField("shm") for out in reply.outputs)
                outputs = [call.decode(out, f"outputs[{i}]") for i, out in enumerate(reply.outputs)]
                session = call.channel  # the pool's session that carried the call
                marks = [float(codec.decode(g.hidden_states, "mark", segment=session.segment).view(-1)[0])
                         for g in request.groups]
            await planes.close()
            return doubler, outputs, x, bf16, marks, session

    doubler, outputs, x, bf16, marks, shm = run(main()) if loop == "asyncio" else uvloop.run(main())
    assert doubler.inputs_in_shm == [True, True]
    assert marks == [-7.0, -7.0], "the servicer's tensors were copies, not views of the segment"
    assert torch.equal(outputs[0], x * 2) and torch.equal(outputs[1], bf16 * 2)
    assert shm.segment.buffer.closed and our_segments() == before


def test_fallbacks_to_grpc_bytes():
    async def main():
        async with plane_server(enabled=False) as (_, _, channel, address):
            not_offered = await DataPlanes(enabled=True).get(address, channel)
        running = await grpc_util.start_server(object(), lambda servicer, server: None, "none", "127.0.0.1", 0)
        async with grpc_util.insecure_channel(running.address) as channel:  # a server without DataPlane
            unimplemented = await DataPlanes(enabled=True).get(running.address, channel)
        await running.stop(None)
        disabled = await DataPlanes(enabled=False).get(running.address, None)
        async with plane_server() as (plane, _, channel, address):
            offer = plane.offer

            def older_offer():  # as a server from before the fixed call headers offers: no shm_frame_version
                message = offer()
                message.ClearField("shm_frame_version")
                return message

            plane.offer = older_offer
            older_server = await DataPlanes(enabled=True).get(address, channel)
        return not_offered, unimplemented, disabled, older_server

    assert run(main()) == (None, None, None, None)


def test_a_payload_larger_than_the_segment_goes_inline_then_the_segment_grows():
    async def main():
        async with plane_server() as (_, doubler, channel, address):
            planes = DataPlanes(enabled=True, segment_bytes=4096)
            x = torch.randn(64, 64)  # 16 KiB > the 4 KiB segment
            pool = await planes.get(address, channel)
            async with pool.session() as call:
                reply = await call.invoke(DOUBLE, request_of(call.encode, x), expert_pb2.ComputeExpertsResponse, 5)
                first = call.decode(reply.outputs[0], "outputs[0]")
                shm = call.channel
            async with (await planes.get(address, channel)).session() as call:
                reply = await call.invoke(DOUBLE, request_of(call.encode, x), expert_pb2.ComputeExpertsResponse, 5)
                second = call.decode(reply.outputs[0], "outputs[0]")
                grown = call.channel
            sessions = list((await planes.get(address, channel)).sessions)
            await planes.close()
            return doubler, x, first, second, shm, grown, sessions

    doubler, x, first, second, shm, grown, sessions = run(main())
    assert torch.equal(first, x * 2) and torch.equal(second, x * 2)
    assert doubler.inputs_in_shm == [False, True]
    assert grown is not shm and grown.segment.size > 4 * x.numel() and shm.segment.buffer.closed
    assert sessions == [grown]  # the small session was replaced, not kept beside the new one


def span_tensor(offset: int, length: int, shape: list[int]) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape,
                             shm=tensor_pb2.SharedMemorySpan(offset=offset, length=length))


BAD_CALLS = {
    "unknown method": (dict(method="test.Echo/Nope"), grpc.StatusCode.UNIMPLEMENTED, "method"),
    "not a request": (dict(method=DOUBLE, request=b"\xff\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT, "request"),
    "reply offset past the end": (dict(method=DOUBLE, reply_offset=1 << 40), grpc.StatusCode.INVALID_ARGUMENT,
                                  "reply_offset"),
    "span outside the segment": (dict(method=DOUBLE, groups=[span_tensor(1 << 30, 256, [1, 64])]),
                                 grpc.StatusCode.INVALID_ARGUMENT, "groups[0].hidden_states.shm"),
    "misaligned span": (dict(method=DOUBLE, groups=[span_tensor(65, 256, [1, 64])]),
                        grpc.StatusCode.INVALID_ARGUMENT, "groups[0].hidden_states.shm"),
    "span length vs shape": (dict(method=DOUBLE, groups=[span_tensor(64, 128, [1, 64])]),
                             grpc.StatusCode.INVALID_ARGUMENT, "groups[0].hidden_states.shm.length"),
    "the servicer refuses": (dict(method=REFUSE), grpc.StatusCode.INVALID_ARGUMENT, "groups[0].expert"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_get_a_precise_status_and_the_session_goes_on(case):
    fields, code, named = BAD_CALLS[case]

    async def main():
        async with plane_server() as (_, _, channel, address):
            planes = DataPlanes(enabled=True)
            shm = (await planes.get(address, channel)).sessions[0]  # its one session, driven by hand
            groups = fields.get("groups", [])
            request = fields.get("request", expert_pb2.ComputeExpertsRequest(groups=[
                expert_pb2.ExpertGroup(layer=0, expert=0, hidden_states=t) for t in groups]).SerializeToString())
            reply = await raw_call(shm, fields["method"], request, fields.get("reply_offset", 1024))
            async with shm.session() as call:  # the same session still serves
                good = await call.invoke(DOUBLE, request_of(call.encode, torch.ones(2, 3)),
                                         expert_pb2.ComputeExpertsResponse, 5)
                good = call.decode(good.outputs[0], "outputs[0]")
            await planes.close()
            return reply, good

    (status, details), good = run(main())
    assert status == code.value[0], (status, details)
    assert details.decode().startswith(named), details
    assert torch.equal(good, torch.full((2, 3), 2.0))


BAD_FRAMES = {  # frame bytes (call id 1) -> what the server answers: a status code and the field named, or None
    "method past the frame": (CALL_FRAME.pack(CALL_FRAME.size - HEADER.size + 3, 1, 1024, 0, 500) + b"abc",
                              (grpc.StatusCode.INVALID_ARGUMENT, "method_length: 500 bytes run past the 29-byte frame")),
    "shorter than a call's header": (HEADER.pack(3) + b"abc", None),  # no call id to answer: the session closes
    "longer than any frame": (HEADER.pack(MAX_FRAME_BYTES + 1) + bytes(64), None),
}


@pytest.mark.parametrize("case", BAD_FRAMES)
def test_bad_call_frames_get_a_precise_status_or_close_their_session_only(case):
    frame, answer = BAD_FRAMES[case]

    async def main():
        async with plane_server() as (_, _, channel, address):
            planes = DataPlanes(enabled=True)
            pool = await planes.get(address, channel)
            async with pool.session() as call:  # the session driven by hand (another serves after, if it closes)
                call.channel.stream.write(frame)
                try:
                    reply = await asyncio.wait_for(call.channel.stream.read(), 10)
                except EOFError:
                    reply = None
                    call.channel.broken = True
                call.channel.call_ids = 1
            async with pool.session() as call:
                good = await call.invoke(DOUBLE, request_of(call.encode, torch.ones(2, 3)),
                                         expert_pb2.ComputeExpertsResponse, 5)
                good = call.decode(good.outputs[0], "outputs[0]")
            await planes.close()
            return reply, good

    reply, good = run(main())
    if answer is None:
        assert reply is None, reply
    else:
        assert reply is not None, "the session closed"
        code, details = answer
        assert REPLY_FRAME.unpack_from(reply)[1:] == (1, code.value[0])
        assert reply[REPLY_FRAME.size:].decode() == details
    assert torch.equal(good, torch.full((2, 3), 2.0))


def test_bad_hellos_are_refused_and_leave_nothing_behind():
    before = our_segments()

    async def main():
        async with plane_server() as (plane, _, channel, address):
            segment = Segment.create(4096)
            offer = plane.offer()
            good = dataplane_pb2.ShmHello(session_key=offer.shm_session_key, segment=segment.name, segment_bytes=4096,
                                          probe=bytes(16), frame_version=FRAME_VERSION)
            replies = {
                "calls framed otherwise": await hello(offer.shm_socket, dataplane_pb2.ShmHello(
                    session_key=plane.offer().shm_session_key, segment=segment.name, segment_bytes=4096)),
                "wrong key": await hello(offer.shm_socket, dataplane_pb2.ShmHello(
                    session_key=b"x" * 32, segment=segment.name, segment_bytes=4096)),
                "path outside /dev/shm": await hello(offer.shm_socket, dataplane_pb2.ShmHello(
                    session_key=plane.offer().shm_session_key, segment="../../etc/passwd", segment_bytes=4096,
                    frame_version=FRAME_VERSION)),
                "size mismatch": await hello(offer.shm_socket, dataplane_pb2.ShmHello(
                    session_key=plane.offer().shm_session_key, segment=segment.name, segment_bytes=8192,
                    frame_version=FRAME_VERSION)),
                "good": await hello(offer.shm_socket, good),
                "key used twice": await hello(offer.shm_socket, good),
            }
            segment.close()
            with pytest.raises(DataPlaneError) as refused:  # a refused client removes its own segment
                bad_offer = dataplane_pb2.DataPlaneOffer(shm_socket=offer.shm_socket, shm_session_key=b"y" * 32,
                                                       shm_frame_version=FRAME_VERSION)
                await ShmChannel.open(address, bad_offer, 4096)
            served = await DataPlanes(enabled=True).get(address, channel)  # still serving
            await served.close()
            return replies, refused.value

    replies, refused = run(main())
    statuses = {name: (grpc.StatusCode.OK.value[0] if not r.status_code else r.status_code, r.status_details)
                for name, r in replies.items()}
    assert statuses["good"][0] == 0
    assert statuses["wrong key"][0] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert statuses["key used twice"][0] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert statuses["path outside /dev/shm"] == (grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                 "hello.segment: '../../etc/passwd' is not a shardmesh segment name")
    assert statuses["size mismatch"][0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert statuses["size mismatch"][1].startswith("hello.segment_bytes")
    assert statuses["calls framed otherwise"][0] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert statuses["calls framed otherwise"][1].startswith("hello.frame_version: 0,")
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    assert our_segments() == before


def test_stop_closes_sessions_and_unmaps_segments():
    async def main():
        async with plane_server() as (plane, _, channel, address):
            shm = (await DataPlanes(enabled=True).get(address, channel)).sessions[0]
            async with shm.session() as call:
                await call.invoke(DOUBLE, request_of(call.encode, torch.ones(1, 4)), expert_pb2.ComputeExpertsResponse, 5)
            await plane.stop()
            with pytest.raises(DataPlaneError) as closed:
                async with shm.session() as call:
                    await call.invoke(DOUBLE, request_of(call.encode, torch.ones(1, 4)),
                                      expert_pb2.ComputeExpertsResponse, 5)
            await shm.close()
            return closed.value, shm

    closed, shm = run(main())
    assert closed.code == grpc.StatusCode.UNAVAILABLE
    assert shm.segment.buffer.closed


def test_a_shared_memory_tensor_in_an_ordinary_message_is_refused():
    message = span_tensor(64, 256, [1, 64])
    with pytest.raises(InvalidArgument) as refused:
        codec.decode(message, "groups[0].hidden_states")
    assert refused.value.field == "groups[0].hidden_states.shm"


def test_an_unreachable_peer_is_asked_again_later():
    async def main():
        planes = DataPlanes(enabled=True)
        async with grpc_util.insecure_channel("127.0.0.1:1") as channel:  # nothing listens there
            first = await planes.get("127.0.0.1:1", channel)
            remembered = "127.0.0.1:1" in planes._channels
        async with plane_server() as (_, _, channel, address):
            await planes.forget([address])
            shm = await planes.get(address, channel)
            session = shm.sessions[0]
            await planes.forget([address])
            forgotten = address not in planes._channels and session.segment.buffer.closed
        return first, remembered, shm, forgotten

    first, remembered, shm, forgotten = run(main())
    assert first is None and not remembered  # not cached: the peer may come back
    assert shm is not None and forgotten


def test_spans_past_the_last_aligned_byte_are_refused():
    import os
    import secrets

    name = f"shardmesh-{secrets.token_hex(16)}"
    with open(SHM_DIR / name, "wb") as file:  # a client could name a segment of any size
        file.write(bytes(1000))
    try:
        segment = Segment.attach(name, 1000)
        assert segment.usable == 960
        assert segment.view(896, 64, torch.float32, [16], "x").numel() == 16
        with pytest.raises(InvalidArgument) as refused:
            segment.view(960, 32, torch.float32, [8], "groups[0].hidden_states")
        assert refused.value.field == "groups[0].hidden_states.shm"
        segment.close()
    finally:
        os.unlink(SHM_DIR / name)
    created = Segment.create(1000)
    assert created.size == 1024 and created.usable == 1024
    created.close()
