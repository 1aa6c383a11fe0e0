"""Dispatch and combine over NCCL links: the `nccl` data plane between a stage and its expert servers.

The call itself (ComputeExperts) stays a gRPC call on the control plane; its tensors travel beside
it as one payload per direction over the link the stage formed with that server (nccl_plane.py:
communicator ids exchanged over DataPlane.JoinNcclGroup). The messages carry `Tensor.nccl` spans
(offset, length) into that payload instead of bytes.

    links = NcclLinks("cuda:0")
    link = await links.get(address, channel, "stage-0")  # formed at the first call to that server
    async with link.call() as call:                    # one call at a time per link
        request = ComputeExpertsRequest(groups=[ExpertGroup(..., hidden_states=call.encode(x))])
        reply = await call.invoke(stub.ComputeExperts, request, timeout=5)
        output = call.decode(reply.outputs[0], "outputs[0]")

Order on a link: the stage sends the request payload (queued on the device's stream), then the
call with metadata naming the link and the payload's size; the server receives the payload before
it runs the method, sends the reply payload before it answers, and names its size in the trailing
metadata; the stage receives it after the answer. A failed call leaves the link in step when the
server received the request payload; otherwise (a refused call, a dead peer) the stage drops the
link and forms a new one. The link's name carries a random part: only its members know it.
"""

import asyncio
import contextlib
import functools
import secrets

import grpc
import torch

from shardmesh import codec
from shardmesh.errors import InvalidArgument
from shardmesh.nccl_plane import NcclJoinError, communicator_for, form_link
from shardmesh.shm_plane import DataPlaneError
from shardmesh.shm_segment import align
from shardmesh.v1 import dataplane_pb2_grpc

GROUP_KEY = "shardmesh-nccl-group"    # metadata: the link a call's payload travels on
BYTES_KEY = "shardmesh-nccl-bytes"    # metadata: the payload's size (request: invocation, reply: trailing)
MAX_PAYLOAD_BYTES = 512 * 2**20       # as the shared-memory plane's largest frame


class PayloadArena:
    """Tensors laid out one after another (64-byte aligned) in the payload of one direction of a
    call: `put` is codec's arena contract, `pack` makes the payload on `device`."""

    def __init__(self, device: str):
        self.device, self.size, self._placed = torch.device(device), 0, []

    def put(self, tensor: torch.Tensor) -> tuple[int, int, str]:
        offset, length = align(self.size), tensor.numel() * tensor.element_size()
        self._placed.append((offset, tensor.detach()))
        self.size = offset + length
        return offset, length, "nccl"

    def pack(self) -> torch.Tensor:
        payload = torch.empty(self.size, dtype=torch.uint8, device=self.device)  # [bytes]
        for offset, tensor in self._placed:
            if tensor.numel():
                payload[offset:offset + tensor.numel() * tensor.element_size()].view(tensor.dtype).copy_(
                    tensor.reshape(-1))
        return payload


class Payload:
    """Received bytes: `view` is codec's segment contract (InvalidArgument naming the field)."""

    def __init__(self, payload: torch.Tensor):
        self.payload = payload  # [bytes] uint8

    def view(self, offset: int, length: int, dtype: torch.dtype, shape: list[int], field: str) -> torch.Tensor:
        if offset % dtype.itemsize or offset + length > self.payload.numel():
            raise InvalidArgument(f"{field}.nccl", f"span [{offset}, {offset + length}) is misaligned or outside "
                                                   f"the {self.payload.numel()}-byte payload")
        if length == 0:
            return torch.empty(shape, dtype=dtype, device=self.payload.device)
        return self.payload[offset:offset + length].view(dtype).view(shape)


def _payload_bytes(text: str | None, key: str) -> int:
    if text is None or not text.isdigit() or int(text) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(key, f"{str(text)[:40]!r} is not a byte count in [0, {MAX_PAYLOAD_BYTES}]")
    return int(text)


class Link:
    """The stage's side of one link (rank 0; the expert server is rank 1)."""

    def __init__(self, group: str, communicator, device: str):
        self.group, self.communicator, self.device = group, communicator, device
        self.lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def call(self):
        async with self.lock:
            yield LinkCall(self)


class LinkCall:
    def __init__(self, link: Link):
        self.link, self.arena = link, PayloadArena(link.device)
        self.payload: Payload | None = None

    def encode(self, tensor: torch.Tensor):
        return codec.encode(tensor, arena=self.arena)

    def decode(self, message, field: str) -> torch.Tensor:
        return codec.decode(message, field, segment=None, cuda_segment=None, nccl_payload=self.payload)

    async def invoke(self, method, request, timeout: float):
        """method: a grpc.aio unary-unary multicallable. Raises grpc.aio.AioRpcError as gRPC does,
        DataPlaneError when the link itself failed (the caller drops the link)."""
        payload = self.arena.pack()
        link = self.link
        try:
            link.communicator.send(payload, 1)
        except Exception as error:
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"nccl link {link.group}: send failed: {error}")
        call = method(request, timeout=timeout, metadata=((GROUP_KEY, link.group), (BYTES_KEY, str(payload.numel()))))
        reply = await call
        trailing = dict(await call.trailing_metadata() or ())
        try:
            size = _payload_bytes(trailing.get(BYTES_KEY), f"trailing metadata {BYTES_KEY}")
        except InvalidArgument as error:
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"nccl link {link.group}: {error}")
        received = torch.empty(size, dtype=torch.uint8, device=link.device)  # [bytes]
        try:
            await asyncio.to_thread(link.communicator.recv, received, 1)
        except Exception as error:
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"nccl link {link.group}: receive failed: {error}")
        self.payload = Payload(received)
        return reply


class NcclLinks:
    """A stage's links to expert servers by address, formed at the first call (DataPlane.JoinNcclGroup
    over the server's gRPC channel). `forget` drops the links of servers that failed or left."""

    def __init__(self, device: str, communicator: type | None = None):
        self.device = device
        self.communicator = communicator or communicator_for(device)
        self._links: dict[str, Link] = {}
        self._forming: dict[str, asyncio.Lock] = {}

    async def get(self, address: str, channel: grpc.aio.Channel, owner: str) -> Link:
        """The link to `address` (named after `owner`, the calling service); DataPlaneError
        (UNAVAILABLE) naming the server when it did not form."""
        async with self._forming.setdefault(address, asyncio.Lock()):
            if address not in self._links:
                group = f"{owner}/experts/{secrets.token_hex(8)}"
                try:
                    communicator = await form_link(group, [dataplane_pb2_grpc.DataPlaneStub(channel)], self.device,
                                                   communicator=self.communicator, owner=f"{owner}/experts")
                except NcclJoinError as error:
                    raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, f"{address}: {error}") from error
                self._links[address] = Link(group, communicator, self.device)
            return self._links[address]

    def forget(self, addresses) -> None:
        for address in addresses:
            self._links.pop(address, None)


def serves_nccl_calls(method):
    """Wraps a unary servicer method of a server whose `self.nccl` is an NcclEndpoint (or None): a
    call naming a link in its metadata gets its request payload from that link before the method
    runs and sends its reply payload after; codec.decode/encode in the method use them. Other
    calls, and every call on a server with no endpoint, pass through untouched (an `nccl` span
    there is refused by codec.decode). Bad metadata: INVALID_ARGUMENT / NOT_FOUND naming the key."""

    @functools.wraps(method)
    async def serve(self, request, context):
        endpoint = self.nccl
        if endpoint is None:  # no links here: no metadata to read on this per-layer path
            return await method(self, request, context)
        metadata = dict(context.invocation_metadata() or ())
        group = metadata.get(GROUP_KEY)
        if group is None:
            return await method(self, request, context)
        if group not in endpoint.links:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"metadata {GROUP_KEY}: no NCCL link {group[:140]!r} here")
        try:
            size = _payload_bytes(metadata.get(BYTES_KEY), f"metadata {BYTES_KEY}")
        except InvalidArgument as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        link, lock = endpoint.links[group], endpoint.locks[group]
        endpoint.used(group)
        async with lock:
            received = torch.empty(size, dtype=torch.uint8, device=endpoint.device)  # [bytes]
            try:
                await asyncio.to_thread(link.recv, received, 0)
            except Exception as error:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"nccl link {group}: receive failed: {error}")
            arena = PayloadArena(endpoint.device)
            token = codec.inbound_call.set((None, arena, None, Payload(received)))
            try:
                response = await method(self, request, context)
            finally:
                codec.inbound_call.reset(token)
            payload = arena.pack()
            link.send(payload, 0)
            context.set_trailing_metadata(((BYTES_KEY, str(payload.numel())),))
            return response

    return serve
