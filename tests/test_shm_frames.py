"""FrameStream (shardmesh/shm_frames.py), the shared-memory plane's socket protocol, fed by hand:
whole frames however the socket's reads cut them, the socket paused while frames wait unread, and
the end of the stream (clean, inside a frame, a frame longer than any allowed)."""

import asyncio

import pytest

from shardmesh.shm_frames import HEADER, MAX_FRAME_BYTES, FrameStream, call_frame, reply_frame


class Transport:
    """What a socket's transport does for the stream: notes pauses, closes it once."""

    def __init__(self, stream: FrameStream):
        self.stream, self.paused, self.closed = stream, False, False

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def write(self, data):
        if self.closed:  # as uvloop's transport does
            raise RuntimeError("unable to perform operation on <UnixTransport closed=True>; the handler is closed")

    def is_closing(self):
        return self.closed

    def close(self):
        if not self.closed:
            self.closed = True
            self.stream.connection_lost(None)


def opened() -> tuple[FrameStream, Transport]:
    stream = FrameStream()
    transport = Transport(stream)
    stream.connection_made(transport)
    return stream, transport


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


FRAMES = [call_frame(1, b"m", b"request", 64), reply_frame(1, 0, b"x" * 300), reply_frame(2, 5, b""), HEADER.pack(0)]


@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_frames_come_whole_however_the_reads_cut_them(cut):
    async def main():
        stream, _ = opened()
        data = b"".join(FRAMES)
        waiting = stream.read()  # a read waiting before any byte came
        for start in range(0, len(data), cut):
            stream.data_received(data[start:start + cut])
        return [await waiting] + [await stream.read() for _ in FRAMES[1:]]

    assert run(main()) == FRAMES


def test_the_socket_pauses_while_two_frames_wait_unread():
    async def main():
        stream, transport = opened()
        stream.data_received(FRAMES[0])
        paused_at_one = transport.paused
        stream.data_received(FRAMES[1] + FRAMES[2])
        paused_at_three = transport.paused
        first, second = await stream.read(), await stream.read()
        paused_at_one_left = transport.paused
        third = await stream.read()
        return paused_at_one, paused_at_three, paused_at_one_left, transport.paused, [first, second, third]

    at_one, at_three, at_one_left, at_none, frames = run(main())
    assert (at_one, at_three, at_one_left, at_none) == (False, True, True, False)
    assert frames == FRAMES[:3]


def test_the_end_of_the_stream():
    async def main():
        clean, transport = opened()
        clean.data_received(FRAMES[0])
        transport.close()
        first = await clean.read()  # frames read before the end is told
        with pytest.raises(EOFError, match="socket closed$"):
            await clean.read()
        cut, transport = opened()
        waiting_cut = cut.read()
        cut.data_received(FRAMES[1][:10])
        transport.close()
        with pytest.raises(EOFError, match="closed inside a frame"):
            await waiting_cut
        too_long, transport = opened()
        waiting_long = too_long.read()
        too_long.data_received(HEADER.pack(MAX_FRAME_BYTES + 1) + b"x")
        with pytest.raises(ValueError, match="exceeds"):
            await waiting_long
        with pytest.raises(ValueError, match="exceeds"):  # and every read after
            await too_long.read()
        await clean.wait_closed()
        return first, transport.closed

    first, closed = run(main())
    assert first == FRAMES[0] and closed  # the stream closed its socket after the frame too long


def test_a_write_after_the_peer_closed_is_a_lost_session():
    """EOFError (what the shm plane's callers read as a lost session: UNAVAILABLE, fail over), not the
    transport's RuntimeError (an expert replica killed mid-run failed the stage's step INTERNAL)."""
    async def main():
        stream, transport = opened()
        stream.write(FRAMES[0])
        transport.close()
        with pytest.raises(EOFError, match="socket closed"):
            stream.write(FRAMES[0])

    run(main())
