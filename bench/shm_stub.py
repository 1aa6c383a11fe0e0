"""The far end of a shared-memory session in the same process, for the in-process benches that drive
a tree's own client code over it (moe_call_python_ab.py, router_turnaround.py): each call the client
writes is handed to a callback with its request bytes, whose answer is fed back as the server's reply
would come. It speaks the tree's framing, so that trees from before the fixed call headers
(shardmesh/shm_frames.py: protobuf ShmFrame calls and a StreamReader) compare with later ones.

    channel = stub_channel("stub", Segment.create(8 << 20), on_call)
    # on_call(request: bytes, reply) serves one call; reply(response: bytes) answers it, then or later

`stub_seconds[0]` sums the CPU seconds the far end spent on the frames themselves (parsing the call,
building the reply: the server's share), which the benches take out of their figures.
"""

import asyncio
import time

from shardmesh import shm_plane
from shardmesh.v1 import dataplane_pb2

stub_seconds = [0.0]


def stub_channel(peer: str, segment, on_call) -> "shm_plane.ShmChannel":
    if hasattr(shm_plane, "FrameStream"):
        return _framed_channel(peer, segment, on_call)
    reader = asyncio.StreamReader()

    class Writer:  # the old framing: ShmFrame calls and replies, read through a StreamReader
        def write(self, data):
            start = time.thread_time()
            call = dataplane_pb2.ShmFrame.FromString(data[shm_plane.HEADER.size:]).call
            stub_seconds[0] += time.thread_time() - start

            def reply(response):
                start = time.thread_time()
                payload = dataplane_pb2.ShmFrame(reply=dataplane_pb2.ShmReply(call_id=call.call_id, response=response))
                payload = payload.SerializeToString()
                stub_seconds[0] += time.thread_time() - start
                reader.feed_data(shm_plane.HEADER.pack(len(payload)) + payload)

            on_call(call.request, reply)

        def close(self):
            pass

    return shm_plane.ShmChannel(peer, segment, reader, Writer())


def _framed_channel(peer: str, segment, on_call) -> "shm_plane.ShmChannel":
    from shardmesh.shm_frames import CALL_FRAME, reply_frame

    stream = shm_plane.FrameStream()

    class Transport:  # under the FrameStream, as the socket's would be
        def write(self, data):
            start = time.thread_time()
            _, call_id, _, _, method_length = CALL_FRAME.unpack_from(data)
            request = data[CALL_FRAME.size + method_length:]
            stub_seconds[0] += time.thread_time() - start

            def reply(response):
                start = time.thread_time()
                frame = reply_frame(call_id, 0, response)
                stub_seconds[0] += time.thread_time() - start
                stream.data_received(frame)

            on_call(request, reply)

        def pause_reading(self):
            pass

        resume_reading = pause_reading

        closed = False

        def close(self):  # as a socket's transport does, once
            if not self.closed:
                self.closed = True
                stream.connection_lost(None)

    stream.connection_made(Transport())
    return shm_plane.ShmChannel(peer, segment, stream)
