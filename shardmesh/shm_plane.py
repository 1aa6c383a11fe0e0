"""The shared-memory data plane, client side: calls to a service on the same host whose tensors
move through a shared segment, with a small framed Unix socket instead of HTTP/2 for the calls.

    planes = DataPlanes(enabled=True)                   # data_planes.py: a peer's sessions, negotiated
    channel = await planes.get(address, grpc_channel)   # ShmPool (shm_pool.py), or None: use gRPC bytes
    async with channel.session() as call:               # one call at a time per session; sessions pooled
        request = ComputeExpertsRequest(groups=[ExpertGroup(..., hidden_states=call.encode(x))])
        reply = await call.invoke("shardmesh.v1.Expert/ComputeExperts", request,
                                  ComputeExpertsResponse, timeout=30)
        output = call.decode(reply.outputs[0], "outputs[0]")   # a copy, safe after the session

Negotiation (data_planes.py, `DataPlanes.get`) goes over the control plane: DataPlane.OfferDataPlanes on the
server's gRPC port (authenticated like any internal call) returns the socket and a single-use
session key; the client creates a segment, writes a random probe at its start and says hello;
the server maps the segment and echoes the probe, which proves both processes share it. Any
failure on the way (another host, no /dev/shm, an older server) leaves the peer on gRPC bytes.
The hello and its reply are protobuf frames (dataplane.proto, ShmFrame); calls and replies a fixed
header and the request or response message as it is (shm_frames.py); nothing is pickled.

GPU services (`DataPlanes(device="cuda:N")`) add a CUDA IPC segment to the hello when the server
offers `cuda_ipc`: tensors on that device then move through device memory both map (cuda_ipc.py),
host shared memory stays for the rest, and a server that cannot map it leaves the session host-only.
"""

import asyncio
import contextlib
import logging
import secrets
import socket

import grpc
import torch

from shardmesh import codec
from shardmesh.cuda_ipc import CudaSegment, DeviceArena
from shardmesh.grpc_util import CONTROL_DEADLINE_S
from shardmesh.shm_frames import FRAME_VERSION, HEADER, REPLY_FRAME, FrameStream, call_frame
from shardmesh.shm_segment import MAX_SEGMENT_BYTES, PROBE_BYTES, ReplyArena, Segment, align
from shardmesh.v1 import dataplane_pb2

log = logging.getLogger(__name__)


class DataPlaneError(Exception):
    """A failed call on the shared-memory plane: `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def status_code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


async def read_frame(stream: FrameStream) -> dataplane_pb2.ShmFrame:
    """The next frame as a ShmFrame (the hello, its reply); EOFError at a clean end, ValueError for a
    frame too large or unparsable."""
    frame = await stream.read()
    try:
        return dataplane_pb2.ShmFrame.FromString(frame[HEADER.size:])
    except Exception as error:  # protobuf's DecodeError
        raise ValueError(f"not a ShmFrame: {error}") from error


def write_frame(stream: FrameStream, frame: dataplane_pb2.ShmFrame) -> None:
    payload = frame.SerializeToString()
    stream.write(HEADER.pack(len(payload)) + payload)


def socket_path(name: str) -> str:
    """An offered socket name -> the address to bind or connect ("@x" = Linux abstract namespace)."""
    return "\0" + name[1:] if name.startswith("@") else name


def connect_unix(name: str) -> socket.socket:
    """A connected, non-blocking Unix stream socket (made here: uvloop's unix functions refuse
    abstract names). A local connect does not wait, unless the listener's backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONTROL_DEADLINE_S)
        sock.connect(socket_path(name))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_stream(name: str) -> FrameStream:
    """A FrameStream connected to the plane's socket `name` (an offered shm_socket)."""
    _, stream = await asyncio.get_running_loop().create_unix_connection(FrameStream, sock=connect_unix(name))
    return stream


class ShmCall:
    """One call in progress: encode request tensors into the segment, invoke, decode replies."""

    def __init__(self, channel: "ShmChannel"):
        self.channel = channel
        self.arena = ReplyArena(channel.segment, PROBE_BYTES)
        if channel.cuda is not None:  # device tensors through the CUDA segment, the rest as before
            self.arena = DeviceArena(self.arena, ReplyArena(channel.cuda, PROBE_BYTES))
        self.inline_bytes = 0  # tensors that did not fit and went inline (the segment grows next time)

    def encode(self, tensor: torch.Tensor):
        spilled = getattr(self.arena, "spilled", 0)
        message = codec.encode(tensor, arena=self.arena)
        self.inline_bytes += len(message.data) + getattr(self.arena, "spilled", 0) - spilled
        return message

    async def invoke(self, method: str, request, response_type, timeout: float | None):
        """The call's reply (response_type); DataPlaneError with the status otherwise. timeout: seconds,
        or None when the caller bounds the call itself (a cancelled call leaves the session broken)."""
        channel, arena = self.channel, self.arena
        channel.call_ids += 1
        call_id, cuda_reply_offset = channel.call_ids, 0
        if isinstance(arena, DeviceArena):
            cuda_reply_offset = align(arena.device.next)
            arena.publish()  # the device has written the request tensors before the server reads them
        stream = channel.stream
        try:
            stream.write(call_frame(call_id, method.encode(), request.SerializeToString(), align(arena.next),
                                    cuda_reply_offset))
            if timeout is None:
                frame = await stream.read()
            else:
                async with asyncio.timeout(timeout):  # cheaper than wait_for: no task per call
                    frame = await stream.read()
        except (OSError, EOFError, ValueError, asyncio.TimeoutError) as error:
            channel.broken = True
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"shared-memory plane to {channel.peer}: {error!r}") from error
        except asyncio.CancelledError:  # the reply may still come: the session is out of step
            channel.broken = True
            raise
        if len(frame) < REPLY_FRAME.size or REPLY_FRAME.unpack_from(frame)[1] != call_id:
            channel.broken = True
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"{channel.peer} answered out of turn")
        code, body = REPLY_FRAME.unpack_from(frame)[2], frame[REPLY_FRAME.size:]
        if code:
            raise DataPlaneError(status_code(code), body.decode(errors="replace"))
        return response_type.FromString(body)

    def decode(self, message, field: str) -> torch.Tensor:
        """A copy of a reply tensor (the segment is reused by the next call)."""
        return self.view(message, field).clone()

    def view(self, message, field: str) -> torch.Tensor:
        """A reply tensor where it lies, no copy: valid only until this session's next call (keep the
        session taken while reading it; decode gives a copy)."""
        self.inline_bytes += len(message.data)  # a reply tensor that did not fit in the segment
        return codec.decode(message, field, segment=self.channel.segment, cuda_segment=self.channel.cuda)


class ShmChannel:
    """One shared-memory session with one server: its segment and socket (`stream`)."""

    def __init__(self, peer: str, segment: Segment, stream: FrameStream, cuda: CudaSegment | None = None):
        self.peer, self.segment, self.stream = peer, segment, stream
        self.cuda = cuda  # the CUDA IPC segment, when the server mapped it
        self.lock = asyncio.Lock()
        self.call_ids = 0
        self.broken = False
        self.wanted = 0  # bytes the segment should have had (after an inline fallback)

    @classmethod
    async def open(cls, peer: str, offer: dataplane_pb2.DataPlaneOffer, size: int,
                   cuda_device: str | None = None, ipc_backend=None) -> "ShmChannel":
        if offer.shm_frame_version != FRAME_VERSION:
            raise DataPlaneError(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"{peer} frames shared-memory calls in version {offer.shm_frame_version}, this "
                                 f"client in {FRAME_VERSION} (an older server? upgrade it)")
        segment = Segment.create(size)
        cuda = None
        try:
            probe = secrets.token_bytes(PROBE_BYTES)
            segment.buffer[:PROBE_BYTES] = probe
            if offer.cuda_ipc and cuda_device is not None:
                cuda = _cuda_segment(peer, size, cuda_device, ipc_backend, probe)
            stream = await open_stream(offer.shm_socket)
            channel = cls(peer, segment, stream)
            hello = dataplane_pb2.ShmHello(session_key=offer.shm_session_key, segment=segment.name,
                                           segment_bytes=segment.size, probe=probe, frame_version=FRAME_VERSION)
            if cuda is not None:
                hello.cuda_ipc_handle, hello.cuda_segment_bytes = cuda.handle, cuda.size
            write_frame(stream, dataplane_pb2.ShmFrame(hello=hello))
            reply = (await asyncio.wait_for(read_frame(stream), CONTROL_DEADLINE_S)).hello_reply
            segment.unlink()  # mapped by both (or refused): nothing stays under /dev/shm
            if reply.status_code:
                await channel.close()
                raise DataPlaneError(status_code(reply.status_code), reply.status_details)
            if reply.probe != probe:
                await channel.close()
                raise DataPlaneError(grpc.StatusCode.FAILED_PRECONDITION, "the server does not share the segment")
            if cuda is not None and reply.cuda_probe == probe:
                channel.cuda, cuda = cuda, None
            elif cuda is not None:
                log.info("%s: no CUDA IPC segment (%s): device tensors go through host shared memory", peer,
                         reply.status_details or "the server read another probe")
            return channel
        except BaseException:
            segment.close()
            raise
        finally:
            if cuda is not None:  # not taken by the channel
                cuda.close()

    @contextlib.asynccontextmanager
    async def session(self):
        async with self.lock:
            call = self.begin()
            yield call
            self.end(call)

    def begin(self) -> ShmCall:
        """A call on this session; the caller has it to itself (session()'s lock, or ShmPool) until end()."""
        if self.broken:
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"shared-memory plane to {self.peer} is closed")
        return ShmCall(self)

    def end(self, call: ShmCall) -> None:
        """After a call that went through: next time, a segment where its tensors would all have fitted."""
        if call.inline_bytes:
            self.wanted = min(MAX_SEGMENT_BYTES, 2 * (self.segment.size + call.inline_bytes))

    async def close(self) -> None:
        self.broken = True
        self.stream.close()
        with contextlib.suppress(Exception):
            await self.stream.wait_closed()
        self.segment.close()
        if self.cuda is not None:
            self.cuda.close()


def _cuda_segment(peer: str, size: int, device: str, backend, probe: bytes) -> CudaSegment | None:
    """Our CUDA IPC segment for a session with `peer`, the probe at its start; None when it cannot be
    made here (no CuPy, out of device memory): the session is then host-only."""
    try:
        cuda = CudaSegment.create(size, device, backend)
    except Exception as error:  # ImportError (no CuPy), CuPy's CUDA errors
        log.info("%s: no CUDA IPC segment on %s (%s): device tensors go through host shared memory", peer, device, error)
        return None
    cuda.write_probe(probe)
    return cuda
