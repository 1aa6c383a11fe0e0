"""ShmPool: the shared-memory sessions of one client with one server, so that several calls to that
server can be in flight at once (two micro-batches' steps on one stage, two steps' expert calls on
one expert server). A session (shm_plane.ShmChannel: a segment and a socket) carries one call at a
time; the server serves its sessions concurrently.

    pool = await planes.get(address, grpc_channel)   # DataPlanes (shm_plane.py): an ShmPool or None
    async with pool.session() as call:              # an idle session, a new one, or the next freed
        reply = await call.invoke(method, request, response_type, timeout)

Sessions open on demand, up to `max_sessions`; each is negotiated like the first (OfferDataPlanes
on the control plane, then the hello on the socket). A session that broke (its peer closed it, a
call timed out or was cancelled mid-way: the socket may be out of step) is closed when its call
ends, and so are the idle ones (they are likely dead too: negotiated again when needed). A session
whose segment proved too small is replaced by a larger one.
"""

import asyncio
from collections.abc import Awaitable, Callable

import grpc

DEFAULT_MAX_SESSIONS = 4


class ShmPool:
    def __init__(self, peer: str, first, open_session: Callable[[int], Awaitable], max_sessions: int = DEFAULT_MAX_SESSIONS):
        """first: an open ShmChannel; open_session(segment_bytes): another, or None when none can be
        opened now (the pool then waits for one of its sessions to be free)."""
        if max_sessions < 1:
            raise ValueError(f"max_sessions {max_sessions} must be >= 1")
        self.peer = peer
        self.max_sessions = max_sessions
        self.segment_bytes = first.segment.size  # of the sessions opened from now on
        self._open_session = open_session
        self.sessions = [first]  # every open session, idle or in a call
        self._idle = [first]     # the most recently used last
        self._opening = 0
        self._freed = asyncio.Condition()
        self._waiting = 0  # _acquire calls waiting on _freed (a release with none skips the condition)
        self.closed = False

    @property
    def usable(self) -> bool:
        """Open with a session that has not broken, or one being opened (else: negotiate a new pool)."""
        return not self.closed and (self._opening > 0 or any(not s.broken for s in self.sessions))

    def session(self) -> "_Session":
        """An ShmCall on a session of this pool for the duration of one call (`async with`)."""
        return _Session(self)

    def idle_session(self) -> "_Session | None":
        """session() when an idle session can take the call at once (entering it waits for nothing:
        no other session to open or close), else None."""
        if self._idle and not self.closed:
            channel = self._idle[-1]  # the one _acquire takes
            if not channel.broken and channel.wanted <= channel.segment.size:
                return _Session(self)
        return None

    async def _acquire(self):
        while True:
            if self.closed:
                raise _plane_error(f"shared-memory plane to {self.peer} is closed")
            while self._idle:
                channel = self._idle.pop()
                if not channel.broken and channel.wanted <= channel.segment.size:
                    return channel
                await self._drop(channel)
            if len(self.sessions) + self._opening < self.max_sessions:
                self._opening += 1
                try:
                    channel = await self._open_session(self.segment_bytes)
                finally:
                    self._opening -= 1
                if channel is not None:
                    if self.closed:
                        await channel.close()
                        continue
                    self.sessions.append(channel)
                    return channel
                if not self.sessions and not self._opening:
                    raise _plane_error(f"no shared-memory session with {self.peer}")
            async with self._freed:  # a session comes back (or is dropped: room to open one)
                if self.closed or self._idle or len(self.sessions) + self._opening < self.max_sessions:
                    continue
                self._waiting += 1
                try:
                    await self._freed.wait()
                finally:
                    self._waiting -= 1

    async def _release(self, channel) -> None:
        if channel.wanted > channel.segment.size:  # next time a segment where the call fits
            self.segment_bytes = max(self.segment_bytes, channel.wanted)
            await self._drop(channel)
        elif channel.broken:
            await self._drop(channel)
            for idle in list(self._idle):  # likely dead as well (the server went away)
                self._idle.remove(idle)
                await self._drop(idle)
        elif self.closed:
            await channel.close()
        else:
            self._idle.append(channel)
        if self._waiting:
            async with self._freed:
                self._freed.notify_all()

    async def _drop(self, channel) -> None:
        if channel in self.sessions:
            self.sessions.remove(channel)
        await channel.close()

    async def close(self) -> None:
        """Close every session (calls in progress on them fail UNAVAILABLE)."""
        self.closed = True
        sessions, self.sessions, self._idle = self.sessions, [], []
        for channel in sessions:
            await channel.close()
        async with self._freed:
            self._freed.notify_all()


def _plane_error(details: str) -> Exception:
    """shm_plane.DataPlaneError(UNAVAILABLE, details) (imported here, on the error path only: shm_plane
    imports this module, and an import statement costs every call it sits in)."""
    from shardmesh.shm_plane import DataPlaneError

    return DataPlaneError(grpc.StatusCode.UNAVAILABLE, details)


class _Session:
    """ShmPool.session(): a class, not an asynccontextmanager (no generator to step: every layer, every step)."""

    __slots__ = ("pool", "channel", "call")

    def __init__(self, pool: ShmPool):
        self.pool, self.channel, self.call = pool, None, None

    async def __aenter__(self):
        self.channel = await self.pool._acquire()
        try:  # the channel is this call's alone until released: no lock of its own needed
            self.call = self.channel.begin()
        except BaseException:
            await self.pool._release(self.channel)
            raise
        return self.call

    async def __aexit__(self, kind, error, traceback) -> bool:
        try:
            if kind is None:
                self.channel.end(self.call)
        finally:
            await self.pool._release(self.channel)
        return False
