"""A tensor-parallel stage's links between its shard servers (transport side; the math is in
shardmesh.models.parallel, the group in shardmesh.tp_group).

The router sees one server per stage: rank 0, registered under the stage's name. Rank 0 fans every
request it gets out to the other shards ("stage-1/tp1", ...) over gRPC: each Step on one long-lived
Step stream per shard (written before rank 0 computes, read after), FreeSequences and
UpdatePlacement as unary calls. All ranks then run the same steps in the same order and meet in
the row-parallel layers' AllReduce. Shards find each other through the group's rendezvous store:
each publishes its advertised address there once the group has formed.

A group that does not form within the join timeout leaves the stage NOT_SERVING (health) and its
steps UNAVAILABLE with the reason; rank 0 then never registers with the router.
"""

import asyncio
import logging

import grpc

from shardmesh import codec, grpc_util
from shardmesh.errors import Unavailable
from shardmesh.tp_group import GlooGroup, TPJoinError
from shardmesh.tp_stage import forward_off_loop, join_group
from shardmesh.v1 import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)


class LazyGroup:
    """A TPGroup whose rank and size are known when the weights load and whose gloo group joins
    later (`join`). Until then, and for good once a collective has failed, all_reduce raises
    TPJoinError with the reason: a stage with a lost peer fails fast instead of waiting again."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.group: GlooGroup | None = None
        self.failure = "the tensor-parallel group has not formed yet"

    def all_reduce(self, tensor):
        if self.group is None:
            raise TPJoinError(self.failure)
        try:
            return self.group.all_reduce(tensor)
        except TPJoinError as error:
            self.group, self.failure = None, f"the group broke: {error}"
            raise


class TPFanout:
    """Rank 0's calls to the other shards of its stage (addresses in rank order, ranks 1..T-1)."""

    def __init__(self, addresses: list[str], security, step_timeout_s: float = 120.0):
        self.addresses = addresses
        self.step_timeout_s = step_timeout_s
        self._channels = [grpc_util.open_channel(a, security) for a in addresses]
        self._stubs = [stage_pb2_grpc.StageStub(c) for c in self._channels]
        self._calls: list = [None] * len(addresses)

    async def send_step(self, request: stage_pb2.StepRequest) -> None:
        for i, stub in enumerate(self._stubs):
            if self._calls[i] is None:
                self._calls[i] = stub.Step()  # long-lived stream; each read below has a deadline
            await self._calls[i].write(request)

    async def finish_step(self, quiet: bool = False) -> None:
        """Read every shard's reply to the step just sent; Unavailable naming a shard that failed
        (quiet: rank 0's own step failed already; just drain the replies)."""
        failure = None
        for i, call in enumerate(self._calls):
            if call is None:
                continue
            try:
                reply = await asyncio.wait_for(call.read(), self.step_timeout_s)
            except (grpc.aio.AioRpcError, asyncio.TimeoutError) as error:
                call.cancel()
                self._calls[i] = None
                detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else "no reply in time"
                failure = failure or f"shard {self.addresses[i]} failed the step: {detail}"
                continue
            if reply is grpc.aio.EOF:
                self._calls[i] = None
                failure = failure or f"shard {self.addresses[i]} closed its step stream"
        if failure and not quiet:
            raise Unavailable("tp", failure)

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

    async def close(self) -> None:
        for call in self._calls:
            if call is not None:
                call.cancel()
        for channel in self._channels:
            await channel.close()


async def join_stage_group(group: LazyGroup, stage_name: str, rendezvous: str, timeout_s: float,
                           advertised: str, security) -> TPFanout | None:
    """Form the gloo group and exchange addresses; on rank 0 returns the fan-out to the others.
    Raises TPJoinError (recorded in `group.failure`) when the group is not complete in time."""
    try:
        joined = await join_group(group.rank, group.world_size, rendezvous, timeout_s, name=stage_name)
        joined.store.set(f"{stage_name}/address/{group.rank}", advertised)
        fanout = None
        if group.rank == 0:
            keys = [f"{stage_name}/address/{rank}" for rank in range(1, group.world_size)]
            addresses = await asyncio.to_thread(lambda: [joined.store.get(key).decode() for key in keys])
            fanout = TPFanout(addresses, security)
    except (TPJoinError, RuntimeError) as error:  # RuntimeError: the store lost a peer while exchanging
        group.failure = f"stage {stage_name} rank {group.rank}: {error}"
        raise TPJoinError(group.failure) from error
    group.group = joined
    log.info("%s rank %d/%d: tensor-parallel group formed at %s", stage_name, group.rank, group.world_size, rendezvous)
    return fanout


async def tp_step(fanout: TPFanout | None, request: stage_pb2.StepRequest, model, batch, experts):
    """One step of this shard's model; on rank 0 of a TP stage, the other shards run it too.
    Validated here first, so a bad request never reaches the other shards."""
    model.validate(batch)
    if fanout is None:
        return await forward_off_loop(model, batch, experts)
    # Re-encoded from the decoded batch: the request may have come over the shared-memory plane,
    # whose tensors live in a segment the other shards do not map.
    forwarded = stage_pb2.StepRequest(step_id=request.step_id, sequences=request.sequences,
                                      traceparent=request.traceparent)
    (forwarded.token_ids if model.is_first else forwarded.hidden_states).CopyFrom(codec.encode(batch.inputs, arena=None))
    await fanout.send_step(forwarded)
    try:
        output = await forward_off_loop(model, batch, experts)
    except BaseException:
        await fanout.finish_step(quiet=True)
        raise
    await fanout.finish_step()
    return output
