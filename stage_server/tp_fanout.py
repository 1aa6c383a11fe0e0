"""TPFanout: rank 0's calls to the other shards of its tensor-parallel stage (transport side;
how a step uses it: stage_server/tp_link.py `tp_step`).

Each Step goes on one long-lived Step stream per shard (written before rank 0 computes, read
after); FreeSequences, UpdatePlacement and GetStageInfo are unary calls with a deadline. Channels
ping every second and give up after 2 s without an answer: a frozen shard breaks its stream
within ~3 s, so rank 0 gives up on a step then, not at the collective timeout.
"""

import asyncio

import grpc

from shardmesh import grpc_util
from shardmesh.errors import Unavailable
from shardmesh.tp_group import TPJoinError, TPStepFailed
from shardmesh.v1 import stage_pb2, stage_pb2_grpc

from stage_server.remote_experts import FAST_FAILURE_OPTIONS


class TPFanout:
    """Rank 0's calls to the other shards of its stage (addresses in rank order, ranks 1..T-1)."""

    def __init__(self, addresses: list[str], security, step_timeout_s: float = 120.0):
        self.addresses = addresses
        self.step_timeout_s = step_timeout_s
        # Keepalive pings every second, 2 s to answer: a frozen shard (SIGSTOP, a wedged host) breaks
        # its step stream within ~3 s, so rank 0 gives up on the step then, not at the collective timeout.
        self._channels = [grpc_util.open_channel(a, security, FAST_FAILURE_OPTIONS) for a in addresses]
        self._stubs = [stage_pb2_grpc.StageStub(c) for c in self._channels]
        self._calls: list = [None] * len(addresses)

    async def send_step(self, request: stage_pb2.StepRequest) -> None:
        """Unavailable naming the shard when a step cannot be written (its stream broke)."""
        for i, stub in enumerate(self._stubs):
            if self._calls[i] is None:
                self._calls[i] = stub.Step()  # long-lived stream; each read below has a deadline
            try:
                await self._calls[i].write(request)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as error:
                call, self._calls[i] = self._calls[i], None
                try:  # the stream ended earlier: say how
                    error = f"its step stream ended: {(await asyncio.wait_for(call.code(), 1)).name} {await call.details()}"
                except (asyncio.TimeoutError, grpc.aio.AioRpcError):
                    pass
                raise Unavailable("tp", f"shard {self.addresses[i]} cannot take the step: {error}") from None

    async def host_ids(self) -> list[str]:
        """Every other shard's StageInfo.host_id (rank order); TPJoinError naming one that fails."""
        results = await asyncio.gather(*(stub.GetStageInfo(stage_pb2.GetStageInfoRequest(),
                                                           timeout=grpc_util.CONTROL_DEADLINE_S)
                                         for stub in self._stubs), return_exceptions=True)
        for address, result in zip(self.addresses, results):
            if isinstance(result, BaseException):
                raise TPJoinError(f"shard {address} did not say its host: {result}")
        return [info.host_id for info in results]

    async def finish_step(self) -> None:
        """Read every shard's reply to the step just sent; Unavailable naming a shard that failed, or
        TPStepFailed when every failure is one the whole group agreed on (the shards are fine)."""
        failure, agreed = None, True
        for i, call in enumerate(self._calls):
            if call is None:
                continue
            try:
                reply = await asyncio.wait_for(call.read(), self.step_timeout_s)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError) as error:
                call.cancel()  # a step that failed ends its stream: the next step opens another
                self._calls[i] = None
                detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else "no reply in time"
                agreed = agreed and TPStepFailed.MARKER in (detail or "")
                failure = failure or f"shard {self.addresses[i]} failed the step: {detail}"
                continue
            if reply is grpc.aio.EOF:
                self._calls[i] = None
                agreed = False
                failure = failure or f"shard {self.addresses[i]} closed its step stream"
        if failure:
            raise (TPStepFailed("experts", failure) if agreed else Unavailable("tp", failure))

    async def free(self, request: stage_pb2.FreeSequencesRequest) -> None:
        await self._unary("FreeSequences", request)

    async def update_placement(self, request: stage_pb2.ExpertPlacement) -> None:
        await self._unary("UpdatePlacement", request)

    async def _unary(self, method: str, request) -> None:
        """`method` on every other shard; Unavailable naming the first that failed."""
        results = await asyncio.gather(*(getattr(stub, method)(request, timeout=grpc_util.CONTROL_DEADLINE_S)
                                         for stub in self._stubs), return_exceptions=True)
        for address, result in zip(self.addresses, results):
            if isinstance(result, grpc.aio.AioRpcError):
                raise Unavailable("tp", f"shard {address} failed {method}: {result.code().name} {result.details()}")
            if isinstance(result, BaseException):
                raise result

    async def reset(self) -> None:
        """Cancel every shard's step stream (a step that cannot complete on every rank)."""
        for i, call in enumerate(self._calls):
            if call is not None:
                call.cancel()
            self._calls[i] = None

    async def close(self) -> None:
        await self.reset()
        for channel in self._channels:
            await channel.close()
