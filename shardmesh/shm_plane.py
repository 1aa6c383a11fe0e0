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
Frames are protobuf (dataplane.proto), length-prefixed; nothing is pickled.

GPU services (`DataPlanes(device="cuda:N")`) add a CUDA IPC segment to the hello when the server
offers `cuda_ipc`: tensors on that device then move through device memory both map (cuda_ipc.py),
host shared memory stays for the rest, and a server that cannot map it leaves the session host-only.
"""

import asyncio
import contextlib
import logging
import secrets
import socket
import struct

import grpc
import torch

from shardmesh import codec
from shardmesh.cuda_ipc import CudaSegment, DeviceArena
from shardmesh.grpc_util import CONTROL_DEADLINE_S
from shardmesh.shm_segment import MAX_SEGMENT_BYTES, PROBE_BYTES, ReplyArena, Segment, align
from shardmesh.v1 import dataplane_pb2

log = logging.getLogger(__name__)
HEADER = struct.Struct("<I")
MAX_FRAME_BYTES = 512 * 2**20  # inline fallbacks included


class DataPlaneError(Exception):
    """A failed call on the shared-memory plane: `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def status_code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


async def read_frame(reader: asyncio.StreamReader) -> dataplane_pb2.ShmFrame:
    """The next frame; EOFError at a clean end, ValueError for a frame too large or unparsable."""
    try:
        (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    except asyncio.IncompleteReadError as error:
        raise EOFError("the data plane socket closed") from error
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return dataplane_pb2.ShmFrame.FromString(await reader.readexactly(length))
    except asyncio.IncompleteReadError as error:
        raise EOFError("the data plane socket closed inside a frame") from error
    except Exception as error:  # protobuf's DecodeError
        raise ValueError(f"not a ShmFrame: {error}") from error


def write_frame(writer: asyncio.StreamWriter, frame: dataplane_pb2.ShmFrame) -> None:
    payload = frame.SerializeToString()
    writer.write(HEADER.pack(len(payload)) + payload)


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
        channel = self.channel
        channel.call_ids += 1
        frame = dataplane_pb2.ShmFrame()
        call = frame.call  # built in place: no copy of the request into the frame
        call.call_id, call.method, call.request = channel.call_ids, method, request.SerializeToString()
        call.reply_offset = align(self.arena.next)
        if isinstance(self.arena, DeviceArena):
            call.cuda_reply_offset = align(self.arena.device.next)
            self.arena.publish()  # the device has written the request tensors before the server reads them
        try:
            write_frame(channel.writer, frame)
            if timeout is None:
                frame = await read_frame(channel.reader)
            else:
                async with asyncio.timeout(timeout):  # cheaper than wait_for: no task per call
                    frame = await read_frame(channel.reader)
        except (OSError, EOFError, ValueError, asyncio.TimeoutError) as error:
            channel.broken = True
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"shared-memory plane to {channel.peer}: {error!r}") from error
        except asyncio.CancelledError:  # the reply may still come: the session is out of step
            channel.broken = True
            raise
        reply = frame.reply
        if frame.WhichOneof("kind") != "reply" or reply.call_id != call.call_id:
            channel.broken = True
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"{channel.peer} answered out of turn")
        if reply.status_code:
            raise DataPlaneError(status_code(reply.status_code), reply.status_details)
        return response_type.FromString(reply.response)

    def decode(self, message, field: str) -> torch.Tensor:
        """A copy of a reply tensor (the segment is reused by the next call)."""
        return self.view(message, field).clone()

    def view(self, message, field: str) -> torch.Tensor:
        """A reply tensor where it lies, no copy: valid only until this session's next call (keep the
        session taken while reading it; decode gives a copy)."""
        self.inline_bytes += len(message.data)  # a reply tensor that did not fit in the segment
        return codec.decode(message, field, segment=self.channel.segment, cuda_segment=self.channel.cuda)


class ShmChannel:
    """One shared-memory session with one server: its segment and socket."""

    def __init__(self, peer: str, segment: Segment, reader, writer, cuda: CudaSegment | None = None):
        self.peer, self.segment, self.reader, self.writer = peer, segment, reader, writer
        self.cuda = cuda  # the CUDA IPC segment, when the server mapped it
        self.lock = asyncio.Lock()
        self.call_ids = 0
        self.broken = False
        self.wanted = 0  # bytes the segment should have had (after an inline fallback)

    @classmethod
    async def open(cls, peer: str, offer: dataplane_pb2.DataPlaneOffer, size: int,
                   cuda_device: str | None = None, ipc_backend=None) -> "ShmChannel":
        segment = Segment.create(size)
        cuda = None
        try:
            probe = secrets.token_bytes(PROBE_BYTES)
            segment.buffer[:PROBE_BYTES] = probe
            if offer.cuda_ipc and cuda_device is not None:
                cuda = _cuda_segment(peer, size, cuda_device, ipc_backend, probe)
            reader, writer = await asyncio.open_unix_connection(sock=connect_unix(offer.shm_socket))
            channel = cls(peer, segment, reader, writer)
            hello = dataplane_pb2.ShmHello(session_key=offer.shm_session_key, segment=segment.name,
                                           segment_bytes=segment.size, probe=probe)
            if cuda is not None:
                hello.cuda_ipc_handle, hello.cuda_segment_bytes = cuda.handle, cuda.size
            write_frame(writer, dataplane_pb2.ShmFrame(hello=hello))
            reply = (await asyncio.wait_for(read_frame(reader), CONTROL_DEADLINE_S)).hello_reply
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
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
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
