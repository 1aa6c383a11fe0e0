"""The shared-memory data plane, server side (the client side and the protocol: shm_plane.py).

`ShmPlaneServer` listens on a Unix socket in the abstract namespace (nothing on disk), accepts
sessions whose key came from `OfferDataPlanes` on the authenticated gRPC port, maps each client's
segment and serves its calls one at a time by calling the service's own servicer methods, with
`codec.inbound_call` set so that the servicer's codec.decode views request tensors in the
segment and codec.encode writes reply tensors there. Every bad frame gets a precise status (or,
when the frame cannot even be read, the session is closed); the server keeps serving. Calls and
replies are framed with fixed headers (shm_frames.py), nothing trusted from them unchecked.

A server on a CUDA device (`device="cuda:N"`) offers `cuda_ipc`: it maps a client's CUDA IPC
segment named in the hello (cuda_ipc.py) and serves device tensors there (the inbound call's third
element); a handle that does not open leaves that session on host shared memory.
"""

import asyncio
import dataclasses
import logging
import secrets
import socket
import time
from collections.abc import Callable

import grpc

from shardmesh import codec
from shardmesh.cuda_ipc import CudaSegment, DeviceArena
from shardmesh.errors import RequestError
from shardmesh.nccl_plane import NcclEndpoint, communicator_for
from shardmesh.shm_frames import CALL_FRAME, FRAME_VERSION, HEADER, FrameStream, reply_frame
from shardmesh.shm_plane import read_frame, socket_path, write_frame
from shardmesh.shm_segment import ReplyArena, Segment
from shardmesh.v1 import dataplane_pb2, dataplane_pb2_grpc

log = logging.getLogger(__name__)
KEY_TTL_S = 60.0
MAX_PENDING_KEYS = 1024


@dataclasses.dataclass(frozen=True)
class Method:
    request_type: type
    handler: Callable        # servicer method: (request, context) or, streaming, (request_iterator, context)
    streaming: bool = False  # bidi stream: each call is one request and its one response


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class ShmContext:
    """The part of grpc.aio.ServicerContext that servicers use."""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        raise _Aborted(code, details)

    def peer(self) -> str:
        return "shm"

    def invocation_metadata(self):
        return ()


_CONTEXT = ShmContext()  # (it keeps no state: one for every unary call)


class _Stream:
    """A streaming servicer method fed one request at a time (one Step stream per session)."""

    def __init__(self, handler: Callable, context: ShmContext):
        self._requests: asyncio.Queue = asyncio.Queue()
        self._responses = handler(self._iterate(), context)

    async def _iterate(self):
        while True:
            yield await self._requests.get()

    async def call(self, request):
        self._requests.put_nowait(request)
        return await self._responses.__anext__()

    async def close(self) -> None:
        await self._responses.aclose()


class ShmPlaneServer:
    def __init__(self, name: str, methods: dict[str, Method], device: str = "cpu", ipc_backend=None):
        self.name, self.methods = name, methods
        self._served = {method.encode(): (method, served) for method, served in methods.items()}  # by the frame's bytes
        # Where client CUDA IPC segments are mapped (None: not offered); `ipc_backend` replaces CuPy (tests).
        self.cuda_device = device if device.startswith("cuda") or ipc_backend is not None else None
        self.ipc_backend = ipc_backend
        self.socket = f"@shardmesh-{secrets.token_hex(16)}"
        self._keys: dict[bytes, float] = {}  # session key -> when offered
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[asyncio.Task] = set()

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # made here: uvloop refuses abstract names
        listener.bind(socket_path(self.socket))
        listener.listen(64)
        listener.setblocking(False)
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: FrameStream(on_open=self._open_session), sock=listener)

    def _open_session(self, frames: FrameStream) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(frames))
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    def offer(self) -> dataplane_pb2.DataPlaneOffer:
        now = time.monotonic()
        self._keys = {k: t for k, t in self._keys.items() if now - t < KEY_TTL_S}
        if len(self._keys) >= MAX_PENDING_KEYS:
            self._keys.pop(next(iter(self._keys)))
        key = secrets.token_bytes(32)
        self._keys[key] = now
        return dataplane_pb2.DataPlaneOffer(shm_socket=self.socket, shm_session_key=key,
                                            cuda_ipc=self.cuda_device is not None, shm_frame_version=FRAME_VERSION)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _serve(self, frames: FrameStream) -> None:
        segment, cuda, streams = None, None, {}
        try:
            segment, cuda = await self._hello(frames)
            while segment is not None:
                frames.write(await self._call(segment, streams, await frames.read(), cuda))
        except EOFError:
            pass
        except (ValueError, OSError) as error:
            log.warning("%s: shm session closed: %s", self.name, error)
        finally:
            for step_stream in streams.values():
                await step_stream.close()
            if segment is not None:
                segment.close()
            if cuda is not None:
                cuda.close()
            frames.close()

    async def _hello(self, frames: FrameStream) -> tuple[Segment | None, CudaSegment | None]:
        hello = (await read_frame(frames)).hello
        code, details, segment, cuda = grpc.StatusCode.OK, "", None, None
        if self._keys.pop(hello.session_key, None) is None:
            code, details = grpc.StatusCode.UNAUTHENTICATED, "hello.session_key: unknown or already used"
        elif hello.frame_version != FRAME_VERSION:
            code, details = grpc.StatusCode.FAILED_PRECONDITION, (
                f"hello.frame_version: {hello.frame_version}, but this server frames calls in version {FRAME_VERSION} "
                f"(an older client? upgrade it)")
        else:
            try:
                segment = Segment.attach(hello.segment, hello.segment_bytes)
            except RequestError as error:
                code, details = grpc.StatusCode.INVALID_ARGUMENT, str(error)
        if segment is not None and hello.cuda_ipc_handle:
            # Not mapped = the session goes on host-only; `details` says why (the status stays OK).
            if self.cuda_device is None:
                details = "hello.cuda_ipc_handle: this server maps no CUDA IPC segments"
            else:
                try:
                    cuda = await asyncio.to_thread(CudaSegment.attach, hello.cuda_ipc_handle, hello.cuda_segment_bytes,
                                                   self.cuda_device, self.ipc_backend)
                except RequestError as error:
                    details = str(error)
        probe = segment.probe() if segment is not None else b""
        write_frame(frames, dataplane_pb2.ShmFrame(hello_reply=dataplane_pb2.ShmHelloReply(
            probe=probe, status_code=code.value[0], status_details=details,
            cuda_probe=cuda.probe() if cuda is not None else b"")))
        return segment, cuda

    async def _call(self, segment: Segment, streams: dict, frame: bytes, cuda: CudaSegment | None = None) -> bytes:
        """The reply frame to one call frame (shm_frames.CALL_FRAME, its length prefix included, which
        FrameStream has checked); ValueError for a frame too short for a call's header."""
        if len(frame) < CALL_FRAME.size:
            raise ValueError(f"a call frame of {len(frame) - HEADER.size} bytes is shorter than a call's "
                             f"{CALL_FRAME.size - HEADER.size}-byte header")
        _, call_id, reply_offset, cuda_reply_offset, method_length = CALL_FRAME.unpack_from(frame)
        start = CALL_FRAME.size + method_length  # of the request
        if start > len(frame):
            return _status(call_id, grpc.StatusCode.INVALID_ARGUMENT, f"method_length: {method_length} bytes run past "
                                                                      f"the {len(frame) - HEADER.size}-byte frame")
        name, method = self._served.get(frame[CALL_FRAME.size:start], (None, None))
        if method is None:
            return _status(call_id, grpc.StatusCode.UNIMPLEMENTED, f"method: "
                           f"{frame[CALL_FRAME.size:start].decode(errors='replace')!r} is not served on this plane")
        if reply_offset > segment.size:
            return _status(call_id, grpc.StatusCode.INVALID_ARGUMENT,
                           f"reply_offset: {reply_offset} is past the {segment.size}-byte segment")
        if cuda_reply_offset > (cuda.size if cuda is not None else 0):
            return _status(call_id, grpc.StatusCode.INVALID_ARGUMENT, f"cuda_reply_offset: {cuda_reply_offset} is "
                                                                      f"past the session's CUDA segment")
        try:
            request = method.request_type.FromString(frame[start:])
        except Exception as error:  # protobuf's DecodeError
            return _status(call_id, grpc.StatusCode.INVALID_ARGUMENT,
                           f"request: not a {method.request_type.__name__}: {error}")
        arena = ReplyArena(segment, reply_offset)
        if cuda is not None:
            arena = DeviceArena(arena, ReplyArena(cuda, cuda_reply_offset))
        token = codec.inbound_call.set((segment, arena, cuda))
        try:
            if method.streaming:
                if name not in streams:
                    streams[name] = _Stream(method.handler, ShmContext())
                response = await streams[name].call(request)
            else:
                response = await method.handler(request, _CONTEXT)
        except _Aborted as error:
            streams.pop(name, None)  # a stream ends with its first error, as over gRPC
            return _status(call_id, error.code, error.details)
        except RequestError as error:  # core code's error the servicer did not translate
            streams.pop(name, None)
            return _status(call_id, getattr(grpc.StatusCode, error.code), str(error))
        except StopAsyncIteration:
            streams.pop(name, None)
            return _status(call_id, grpc.StatusCode.UNAVAILABLE, f"{self.name} ended its {name} stream")
        except Exception as error:
            log.exception("%s: %s failed on the shm plane", self.name, name)
            streams.pop(name, None)
            return _status(call_id, grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
        finally:
            codec.inbound_call.reset(token)
        if cuda is not None:
            arena.publish()  # the device has written the reply tensors before the client reads them
        return reply_frame(call_id, 0, response.SerializeToString())


def _status(call_id: int, code: grpc.StatusCode, details: str) -> bytes:
    return reply_frame(call_id, code.value[0], details.encode(errors="replace"))


class DataPlaneServicer(dataplane_pb2_grpc.DataPlaneServicer):
    """OfferDataPlanes on the gRPC port: the shared-memory plane when this server runs one.
    JoinNcclGroup: NCCL communicators of this GPU server (nccl_plane.NcclEndpoint), when it has one."""

    def __init__(self, plane: ShmPlaneServer | None, nccl=None):
        self.plane, self.nccl = plane, nccl

    async def OfferDataPlanes(self, request, context):
        return self.plane.offer() if self.plane is not None else dataplane_pb2.DataPlaneOffer()

    async def JoinNcclGroup(self, request, context):
        if self.nccl is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server is not on a CUDA device: "
                                                                     "it joins no NCCL communicator")
        return await self.nccl.join(request, context)


SERVICE_NAME = dataplane_pb2.DESCRIPTOR.services_by_name["DataPlane"].full_name


async def start_data_plane(name: str, methods: dict[str, Method], enabled: bool, device: str = "cpu",
                           nccl: bool = False):
    """The shared-memory plane of one server (None when not `enabled` or without /dev/shm), and the
    DataPlane gRPC service offering it, as (servicer, add_to_server, service name) for start_server.
    On a CUDA `device` it also maps clients' CUDA IPC segments there and joins NCCL links; with
    `nccl` on the CPU it joins links too, over gloo (nccl_plane.GlooCommunicator)."""
    plane = ShmPlaneServer(name, methods, device=device) if enabled and Segment.available() else None
    if plane is not None:
        await plane.start()
    # CuPy imported at the first join
    nccl = NcclEndpoint(device, communicator_for(device)) if nccl or device.startswith("cuda") else None
    return plane, (DataPlaneServicer(plane, nccl), dataplane_pb2_grpc.add_DataPlaneServicer_to_server, SERVICE_NAME)
