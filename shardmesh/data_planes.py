"""`DataPlanes`: per peer address, the shared-memory sessions negotiated with it (an ShmPool of
shm_plane.ShmChannel), or None when the peer cannot share memory with us (tensors then go in gRPC
messages). The protocol and one session: shm_plane.py; the pool: shm_pool.py."""

import asyncio
import logging

import grpc

from shardmesh.grpc_util import CONTROL_DEADLINE_S
from shardmesh.shm_plane import DataPlaneError, ShmChannel
from shardmesh.shm_pool import DEFAULT_MAX_SESSIONS, ShmPool
from shardmesh.shm_segment import Segment
from shardmesh.v1 import dataplane_pb2, dataplane_pb2_grpc

log = logging.getLogger(__name__)
INITIAL_SEGMENT_BYTES = 8 * 2**20
_RETRY = object()  # negotiation: the peer did not answer


class DataPlanes:
    """Per peer address: the shared-memory sessions negotiated with it (ShmPool), or None (gRPC bytes)."""

    def __init__(self, enabled: bool, segment_bytes: int = INITIAL_SEGMENT_BYTES, device: str = "cpu",
                 ipc_backend=None, max_sessions: int = DEFAULT_MAX_SESSIONS):
        self.enabled = enabled and Segment.available()
        self.segment_bytes = segment_bytes
        self.max_sessions = max_sessions  # per peer: calls to one peer in flight at once
        # Our device, when CUDA IPC segments can be offered to servers that map them (cuda_ipc.py);
        # `ipc_backend` replaces CuPy (tests: a fake backend serves any device, the CPU included).
        self.cuda_device = device if device.startswith("cuda") or ipc_backend is not None else None
        self.ipc_backend = ipc_backend
        self._channels: dict[str, ShmPool | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _usable(self, address: str) -> bool:
        """Negotiated, and (if shared memory) with a session that has not broken."""
        if address not in self._channels:
            return False
        pool = self._channels[address]
        return pool is None or pool.usable

    def ready(self, address: str) -> ShmPool | None:
        """The shared-memory sessions with `address` when negotiated before (not yet known to have
        broken: check the session you take), else None: ask `get`, which negotiates."""
        return self._channels.get(address) if self.enabled else None

    async def get(self, address: str, grpc_channel: grpc.aio.Channel) -> ShmPool | None:
        """The shared-memory sessions with `address` (negotiated over `grpc_channel` on first use,
        and again once they all broke), or None: send tensors in gRPC messages. Enter its session()
        at once (no await in between), so it is not replaced under you."""
        if not self.enabled:
            return None
        if not self._usable(address):
            async with self._locks.setdefault(address, asyncio.Lock()):
                if not self._usable(address):
                    old = self._channels.pop(address, None)
                    size = max(self.segment_bytes, old.segment_bytes if old else 0)
                    if old is not None:
                        await old.close()
                    channel = await self._negotiate(address, grpc_channel, size)
                    if channel is _RETRY:
                        return None  # the peer is unreachable now: this call goes (and fails) over gRPC
                    self._channels[address] = channel if channel is None else ShmPool(
                        address, channel, lambda size: self._another(address, grpc_channel, size), self.max_sessions)
        return self._channels[address]

    async def _another(self, address: str, grpc_channel: grpc.aio.Channel, size: int) -> ShmChannel | None:
        """One more session with `address` for its pool, or None when none opens now."""
        channel = await self._negotiate(address, grpc_channel, size)
        return None if channel is _RETRY else channel

    async def _negotiate(self, address: str, grpc_channel: grpc.aio.Channel, size: int):
        """A channel, None (the peer cannot share memory with us: gRPC bytes for good), or _RETRY
        (the peer did not answer: ask again next time, it may come back)."""
        try:
            offer = await dataplane_pb2_grpc.DataPlaneStub(grpc_channel).OfferDataPlanes(
                dataplane_pb2.OfferDataPlanesRequest(), timeout=CONTROL_DEADLINE_S)
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return _RETRY
            log.info("%s: offers no data plane (%s): tensors go in gRPC messages", address, error.code().name)
            return None
        if not offer.shm_socket:
            return None
        try:
            channel = await ShmChannel.open(address, offer, size, self.cuda_device, self.ipc_backend)
        except (OSError, EOFError, ValueError, DataPlaneError, asyncio.TimeoutError) as error:
            log.info("%s: no shared-memory plane (%s): tensors go in gRPC messages", address, error)
            return None
        log.info("%s: shared-memory plane with a %d MiB segment%s", address, size >> 20,
                 " and a CUDA IPC segment" if channel.cuda is not None else "")
        return channel

    async def forget(self, addresses) -> None:
        """Close the channels to peers that left (negotiated again if they come back)."""
        for address in addresses:
            channel = self._channels.pop(address, None)
            if channel is not None:
                await channel.close()

    async def close(self) -> None:
        await self.forget(list(self._channels))
