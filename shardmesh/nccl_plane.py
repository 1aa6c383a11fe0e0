"""NCCL links between GPU services (other nodes included): communicators through CuPy whose unique
ids are exchanged over the gRPC control plane (DataPlane.JoinNcclGroup, dataplane.proto).

    # rank 0 (a stage): make the id, ask every peer to join with its rank, join as rank 0 meanwhile
    link = await form_link("stage-0/experts", [expert_stub_a, expert_stub_b], "cuda:0")
    link.send(hidden_states, peer=1)           # on the device's current stream
    # the peer's servicer (NcclEndpoint, behind DataPlaneServicer) holds its side:
    endpoint.links["stage-0/experts"].recv(buffer, peer=0)

The communicator class is injectable (`communicator=`): `CupyCommunicator` on GPUs (CuPy imported
lazily, only when a link is made), a fake in the CPU tests, so CI covers the handshake. NCCL puts
at most one rank of a communicator on one GPU, so a real link needs two GPUs (one node or two).
"""

import asyncio
import logging
import re
import typing

import grpc
import torch

from shardmesh.grpc_util import CONTROL_DEADLINE_S
from shardmesh.v1 import dataplane_pb2

log = logging.getLogger(__name__)
UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId)
MAX_WORLD_SIZE = 1024
GROUP_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
JOIN_TIMEOUT_S = 60.0  # ncclCommInitRank waits for every rank
MAX_LINKS = 64  # a server keeps at most this many links (idle ones past it are dropped, oldest use first)


class Communicator(typing.Protocol):
    """One rank of an NCCL communicator (constructing it blocks until every rank has joined)."""

    def __init__(self, world_size: int, unique_id: bytes, rank: int, device: str): ...

    @staticmethod
    def unique_id() -> bytes: ...

    def send(self, tensor: torch.Tensor, peer: int) -> None: ...

    def recv(self, tensor: torch.Tensor, peer: int) -> None: ...


class CupyCommunicator:
    """cupy.cuda.nccl.NcclCommunicator on `device`; tensors move as raw bytes on the current stream."""

    def __init__(self, world_size: int, unique_id: bytes, rank: int, device: str):
        from cupy.cuda import nccl  # lazily: the `gpu` extra

        self.nccl, self.device, self.rank = nccl, torch.device(device), rank
        with torch.cuda.device(self.device):
            try:  # CuPy 14 takes the id as bytes; older CuPy as a tuple of C chars (signed)
                self.comm = nccl.NcclCommunicator(world_size, bytes(unique_id), rank)
            except TypeError:
                signed = tuple(b - 256 if b > 127 else b for b in unique_id)
                self.comm = nccl.NcclCommunicator(world_size, signed, rank)

    @staticmethod
    def unique_id() -> bytes:
        from cupy.cuda import nccl

        unique_id = nccl.get_unique_id()  # bytes (CuPy 14) or a tuple of signed chars (older)
        return unique_id if isinstance(unique_id, bytes) else bytes(value & 0xFF for value in unique_id)

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        assert tensor.is_contiguous() and tensor.device == self.device
        self.comm.send(tensor.data_ptr(), tensor.numel() * tensor.element_size(), self.nccl.NCCL_UINT8, peer,
                       self._stream())

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        assert tensor.is_contiguous() and tensor.device == self.device
        self.comm.recv(tensor.data_ptr(), tensor.numel() * tensor.element_size(), self.nccl.NCCL_UINT8, peer,
                       self._stream())

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Several sends and receives as one NCCL group (a rank may send to itself inside one)."""
        self.nccl.groupStart()
        try:
            for tensor, peer in sends:
                self.send(tensor, peer)
            for tensor, peer in recvs:
                self.recv(tensor, peer)
        finally:
            self.nccl.groupEnd()


class GlooCommunicator:
    """The same point-to-point contract over torch.distributed gloo, for services on the CPU (the
    `nccl` data plane of CPU services, and what the CPU tests run): the unique id names a TCP
    store that rank 0 opens on loopback, so every rank must be on rank 0's host. `send` returns
    once the bytes are queued (as NCCL's does on a stream); `recv` returns once they are here."""

    TIMEOUT_S = 30.0  # a send or receive whose peer never answers fails after this

    def __init__(self, world_size: int, unique_id: bytes, rank: int, device: str):
        import datetime

        import torch.distributed as dist

        host, port = unique_id.rstrip(b"\0").decode().removeprefix("gloo:").rsplit(":", 1)
        timeout = datetime.timedelta(seconds=self.TIMEOUT_S)
        store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=timeout)
        self.group, self.rank, self._sending = dist.ProcessGroupGloo(store, rank, world_size, timeout), rank, []

    @staticmethod
    def unique_id() -> bytes:
        import socket

        with socket.socket() as probe:  # a free loopback port for rank 0's store
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return f"gloo:127.0.0.1:{port}".encode().ljust(UNIQUE_ID_BYTES, b"\0")

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._sending = [work for work in self._sending if not work.is_completed()]
        self._sending.append(self.group.send([tensor.view(torch.uint8).reshape(-1)], peer, 0))

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        for work in self._sending:  # a failed send surfaces here, not silently
            work.wait()
        self._sending = []
        self.group.recv([tensor.view(torch.uint8).reshape(-1)], peer, 0).wait()


def communicator_for(device: str) -> type:
    """CuPy's NCCL on CUDA devices, gloo point to point on the CPU."""
    return CupyCommunicator if device.startswith("cuda") else GlooCommunicator


class NcclJoinError(RuntimeError):
    """A link did not form: the message names the peer and why."""


class NcclEndpoint:
    """A server's side of JoinNcclGroup: validates the request, joins as the asked rank, keeps the
    communicator under the group's name (`links`). Answers through `context.abort` with a precise
    status; the server keeps serving."""

    def __init__(self, device: str, communicator: type = CupyCommunicator, join_timeout_s: float = JOIN_TIMEOUT_S):
        self.device, self.communicator, self.join_timeout_s = device, communicator, join_timeout_s
        self.links: dict[str, Communicator] = {}  # least recently used first (`used` moves one to the end)
        self.locks: dict[str, asyncio.Lock] = {}  # one call at a time per link (nccl_dispatch.py)
        self.owners: dict[str, str] = {}  # owner -> its current group (JoinNcclGroupRequest.owner)
        self._joining: set[str] = set()

    async def join(self, request: dataplane_pb2.JoinNcclGroupRequest, context) -> dataplane_pb2.JoinNcclGroupReply:
        problem = check_join(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.group in self.links or request.group in self._joining:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"group: {request.group!r} is already joined here")
        self._joining.add(request.group)
        try:
            communicator = await asyncio.wait_for(asyncio.to_thread(
                self.communicator, request.world_size, request.unique_id, request.rank, self.device), self.join_timeout_s)
        except asyncio.TimeoutError:  # the init thread is left to NCCL's own failure
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"group {request.group!r}: the other ranks did not "
                                                                   f"join within {self.join_timeout_s} s")
        except ImportError as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no NCCL here: {error}")
        except Exception as error:  # NCCL's own errors (CuPy's NcclError), a bad id
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"group {request.group!r}: NCCL init failed: {error}")
        finally:
            self._joining.discard(request.group)
        self.links[request.group], self.locks[request.group] = communicator, asyncio.Lock()
        log.info("joined NCCL group %r as rank %d/%d on %s", request.group, request.rank, request.world_size, self.device)
        self._prune(request.group, request.owner)
        return dataplane_pb2.JoinNcclGroupReply(device=self.device, rank=request.rank)

    def used(self, group: str) -> None:
        """A call just used `group`: it becomes the most recently used link."""
        self.links[group] = self.links.pop(group)

    def _prune(self, joined: str, owner: str) -> None:
        """Drop the link `owner` had before `joined`, then the least recently used idle links past
        MAX_LINKS. A dropped link's communicator goes with its last reference (a call still running
        on it keeps its own); its peer's next call naming it gets NOT_FOUND and forms a new one."""
        stale = []
        if owner:
            previous = self.owners.get(owner)
            self.owners[owner] = joined
            if previous is not None and previous != joined:
                stale.append((previous, f"superseded by {joined!r} of the same owner"))
        excess = len(self.links) - len(stale) - MAX_LINKS
        for group in list(self.links)[:max(excess, 0)]:
            if group != joined and not self.locks[group].locked():
                stale.append((group, f"least recently used of more than {MAX_LINKS} links"))
        for group, why in stale:
            if self.links.pop(group, None) is not None:
                self.locks.pop(group, None)
                log.info("dropped NCCL group %r: %s", group, why)
        self.owners = {name: group for name, group in self.owners.items() if group in self.links}


def check_join(request: dataplane_pb2.JoinNcclGroupRequest) -> str:
    """'' or the first field of the request that is wrong, named, with why."""
    if len(request.unique_id) != UNIQUE_ID_BYTES:
        return f"unique_id: {len(request.unique_id)} bytes, not {UNIQUE_ID_BYTES}"
    if not 2 <= request.world_size <= MAX_WORLD_SIZE:
        return f"world_size: {request.world_size} is not in [2, {MAX_WORLD_SIZE}]"
    if not 1 <= request.rank < request.world_size:
        return f"rank: {request.rank} is not in [1, {request.world_size}) (the caller is rank 0)"
    if not GROUP_NAME.fullmatch(request.group):
        return f"group: {request.group[:140]!r} is not 1 to 128 of [A-Za-z0-9_.:/-]"
    if request.owner and not GROUP_NAME.fullmatch(request.owner):
        return f"owner: {request.owner[:140]!r} is not empty or 1 to 128 of [A-Za-z0-9_.:/-]"
    return ""


async def form_link(group: str, peers: list, device: str, communicator: type = CupyCommunicator,
                    join_timeout_s: float = JOIN_TIMEOUT_S, owner: str = "") -> Communicator:
    """Rank 0 of a new communicator with `peers` (DataPlane stubs; peer i takes rank i + 1): the id
    is made here, sent to every peer over gRPC while this process joins as rank 0. `owner`: this
    caller's one link with those peers (their earlier link of that owner is dropped). Raises
    NcclJoinError naming the first peer that failed (its status), or a timeout."""
    unique_id = communicator.unique_id()
    world_size = len(peers) + 1
    joins = [stub.JoinNcclGroup(dataplane_pb2.JoinNcclGroupRequest(
        unique_id=unique_id, world_size=world_size, rank=rank, group=group, owner=owner), timeout=join_timeout_s + CONTROL_DEADLINE_S)
        for rank, stub in enumerate(peers, start=1)]
    ours = asyncio.ensure_future(asyncio.to_thread(communicator, world_size, unique_id, 0, device))
    replies = await asyncio.gather(*joins, return_exceptions=True)
    for rank, reply in enumerate(replies, start=1):
        if isinstance(reply, grpc.aio.AioRpcError):
            ours.cancel()  # the thread stays in NCCL's init until NCCL gives up; nothing waits for it
            raise NcclJoinError(f"group {group!r}: rank {rank} did not join: {reply.code().name} {reply.details()}")
        if isinstance(reply, BaseException):
            raise reply
    try:
        return await asyncio.wait_for(ours, join_timeout_s)
    except asyncio.TimeoutError:
        raise NcclJoinError(f"group {group!r}: rank 0 did not join within {join_timeout_s} s") from None
