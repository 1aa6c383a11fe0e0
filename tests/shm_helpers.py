"""Driving the shared-memory plane by hand (shardmesh/shm_frames.py's frames): hellos and calls with
any field a client could send, for the tests of bad input."""

import asyncio

from shardmesh.shm_frames import REPLY_FRAME, call_frame
from shardmesh.shm_plane import ShmChannel, open_stream, read_frame, write_frame
from shardmesh.v1 import dataplane_pb2


async def hello(socket: str, message: dataplane_pb2.ShmHello) -> dataplane_pb2.ShmHelloReply:
    """The server's answer to `message` on a new connection to `socket` (closed after)."""
    stream = await open_stream(socket)
    try:
        write_frame(stream, dataplane_pb2.ShmFrame(hello=message))
        return (await asyncio.wait_for(read_frame(stream), 20)).hello_reply
    finally:
        stream.close()


async def raw_call(channel: ShmChannel, method: str, request: bytes, reply_offset: int,
                   cuda_reply_offset: int = 0) -> tuple[int, bytes]:
    """One call on an open session, framed as ShmCall.invoke frames it: (status code, response or details)."""
    channel.call_ids += 1
    channel.stream.write(call_frame(channel.call_ids, method.encode(), request, reply_offset, cuda_reply_offset))
    return await reply_to(channel)


async def reply_to(channel: ShmChannel) -> tuple[int, bytes]:
    """The reply to the session's last call: (status code, response or details); asserts it answers that call."""
    frame = await asyncio.wait_for(channel.stream.read(), 20)
    _, call_id, code = REPLY_FRAME.unpack_from(frame)
    assert call_id == channel.call_ids, (call_id, channel.call_ids)
    return code, frame[REPLY_FRAME.size:]
