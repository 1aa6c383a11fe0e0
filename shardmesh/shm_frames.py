"""The shared-memory plane's socket (shm_plane.py, shm_server.py): frames, each a 4-byte little-endian
length and that many bytes, read whole by FrameStream, and the fixed headers of calls and replies
(dataplane.proto, "Calls"): the request and response messages go as they are, with no protobuf frame
around them to serialize and parse again on each side.

FrameStream is the socket's asyncio protocol: one callback per read of the socket, which nearly
always holds exactly one frame (a frame is small: its tensors lie in the segment), handed to the
waiting read() as it is. Lengths come from the peer: a frame longer than MAX_FRAME_BYTES ends the
stream, and the headers' own fields are checked by whoever parses them (shm_server.py, shm_plane.py).
"""

import asyncio
import collections
import struct

HEADER = struct.Struct("<I")          # every frame: the length of the bytes that follow
# A call: length, call_id, reply_offset, cuda_reply_offset, method_length; then the method, the request.
CALL_FRAME = struct.Struct("<IQQQH")
# A reply: length, call_id, status_code; then the response (status 0) or the status details (UTF-8).
REPLY_FRAME = struct.Struct("<IQI")
FRAME_VERSION = 1  # DataPlaneOffer.shm_frame_version, ShmHello.frame_version: calls framed as above
MAX_FRAME_BYTES = 512 * 2**20  # inline fallbacks included


def call_frame(call_id: int, method: bytes, request: bytes, reply_offset: int, cuda_reply_offset: int = 0) -> bytes:
    """One call's frame: `request` the serialized request message of `method` (UTF-8)."""
    return CALL_FRAME.pack(CALL_FRAME.size - HEADER.size + len(method) + len(request), call_id, reply_offset,
                           cuda_reply_offset, len(method)) + method + request


def reply_frame(call_id: int, status_code: int, body: bytes) -> bytes:
    """One reply's frame: `body` the serialized response (status_code 0) or the status details."""
    return REPLY_FRAME.pack(REPLY_FRAME.size - HEADER.size + len(body), call_id, status_code) + body


class FrameStream(asyncio.Protocol):
    """One end of the plane's socket: write(frame), and `await read()` for the next whole frame (its
    length prefix included: the headers' offsets count it). read() raises EOFError once the peer has
    closed and every frame is read, ValueError after a frame longer than MAX_FRAME_BYTES (the socket
    is then closed). Frames come one at a time (a call, then its reply): while two wait unread, the
    socket is not read (the peer's writes wait in the kernel)."""

    def __init__(self, on_open=None):
        self._on_open = on_open  # called with this stream once connected (the server starts a session)
        self.transport = None
        self._buffer = bytearray()  # the start of a frame not whole yet
        self._frames: collections.deque[bytes] = collections.deque()  # whole frames not read yet
        self._waiter: asyncio.Future | None = None  # the read() waiting for a frame
        self._error: tuple[type, str] | None = None  # what read() raises once the frames are read
        self._paused = False
        self._loop = self._closed = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        if self._on_open is not None:
            self._on_open(self)

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        if not self._buffer and len(data) >= HEADER.size and HEADER.unpack_from(data)[0] == len(data) - HEADER.size:
            self._deliver(data)  # exactly one whole frame (nearly every read)
            return
        buffer = self._buffer
        buffer += data
        while len(buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(buffer)
            if length > MAX_FRAME_BYTES:
                self._end(ValueError, f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
                self.transport.close()
                return
            end = HEADER.size + length
            if len(buffer) < end:
                return
            self._deliver(bytes(buffer[:end]))
            del buffer[:end]

    def _deliver(self, frame: bytes) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():  # (a read cancelled by its caller's timeout is done)
            waiter.set_result(frame)
            return
        self._frames.append(frame)
        if len(self._frames) > 1 and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def read(self) -> asyncio.Future:
        """A future of the next frame (bytes), one read at a time."""
        future = self._loop.create_future()
        if self._frames:
            future.set_result(self._frames.popleft())
            if self._paused and not self._frames:
                self._paused = False
                self.transport.resume_reading()
        elif self._error is not None:
            future.set_exception(self._error[0](self._error[1]))
        else:
            self._waiter = future
        return future

    def write(self, frame: bytes) -> None:
        """Send one frame; EOFError once the socket is closed or closing (the peer died: uvloop's
        transport would raise RuntimeError, which callers would not read as a lost session)."""
        if self.transport.is_closing():
            raise EOFError(self._error[1] if self._error is not None else "the data plane socket is closed")
        self.transport.write(frame)

    def connection_lost(self, error: Exception | None) -> None:
        cut = " inside a frame" if self._buffer else ""
        self._end(EOFError, f"the data plane socket closed{cut}" + (f": {error!r}" if error is not None else ""))
        self._closed.set_result(None)

    def _end(self, kind: type, details: str) -> None:
        if self._error is None:
            self._error = (kind, details)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._error[0](self._error[1]))

    def close(self) -> None:
        self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)
