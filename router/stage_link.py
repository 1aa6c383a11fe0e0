"""StageLink: the router's long-lived Step stream to one stage (router/pipeline.py runs a batch
step through every link in order). Steps are written in call order; a reader task hands the
responses, which come back in the same order, to their callers. A stage that stops answering
(its stream breaks, a step passes its deadline) raises `StageLost`."""

import asyncio
import collections
import logging

import grpc
import torch

from shardmesh import codec
from shardmesh.data_planes import DataPlanes
from shardmesh.errors import RequestError, Unavailable
from shardmesh.grpc_util import CONTROL_DEADLINE_S, open_channel
from shardmesh.sampling import GreedyTokens
from shardmesh.shm_plane import DataPlaneError
from shardmesh.telemetry import tracing
from shardmesh.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)
DEFAULT_STEP_TIMEOUT_S = 10.0  # a step's deadline at a stage: the router's --step-timeout (pipeline.py adds per token)
STEP_METHOD = "shardmesh.v1.Stage/Step"
# Transport failures: the stage may be gone. Any other status is the stage refusing the request.
LOST_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
EXPERTS_FAILED = "experts: "  # a live stage's answer when its expert servers failed (stage_server/remote_experts.py)


def _stage_lost(code: grpc.StatusCode, details: str) -> bool:
    """Whether a failed step means the stage itself may be gone. A stage that answers that its
    experts failed is alive and its KV caches are intact: that is the experts' fault (the router's
    expert probes handle it), not a reason to probe the stage and replay every sequence."""
    return code in LOST_CODES and not details.startswith(EXPERTS_FAILED)
# Router -> stage channels ping every 2 s and give up after 3 s more without an answer (servers
# accept pings every 0.5 s: shardmesh.grpc_util): a frozen stage breaks its gRPC Step stream within
# ~5 s, during a long step or while idle. Pings are answered by gRPC's own threads, in
# milliseconds even at load ~10. (Steps on the shared-memory plane rely on their deadline.)
STAGE_CHANNEL_OPTIONS = {"grpc.keepalive_time_ms": 2_000, "grpc.keepalive_timeout_ms": 3_000}


def _step_request(step_id: int, sequences: list, field: str, tensor: tensor_pb2.Tensor,
                  greedy: bool) -> stage_pb2.StepRequest:
    """The StepRequest of these sequences (a SequenceSlice each: shardmesh.sequence's or the wire's)
    with `tensor` as its `field`."""
    request = stage_pb2.StepRequest(step_id=step_id, **{field: tensor}, traceparent=tracing.current_traceparent(),
                                    greedy_token_ids=greedy)
    add = request.sequences.add  # (in place: no message per sequence made, then copied in)
    for s in sequences:
        add(sequence_id=s.sequence_id, start_position=s.start_position, num_tokens=s.num_tokens)
    return request


class StageLost(Unavailable):
    """A stage stopped answering (transport failure or deadline): maybe dead, maybe frozen."""


class StageLink:
    """One stage server: its channel and the current Step stream (reopened after a failure)."""

    def __init__(self, name: str, address: str, security=None, data_planes: DataPlanes | None = None):
        self.name, self.address = name, address
        self.data_planes = data_planes  # a stage on this host is reached over shared memory when it offers it
        self.channel = open_channel(address, security, STAGE_CHANNEL_OPTIONS)
        self.stub = stage_pb2_grpc.StageStub(self.channel)
        self._call = None
        self._pending: collections.deque = collections.deque()  # (step_id, future) of the current call, in order
        self._reader: asyncio.Task | None = None
        self._write_lock = asyncio.Lock()
        # Called (as a task) when the stream breaks while no step is in flight: an idle stage died.
        self.on_idle_loss = None

    async def step(self, request: stage_pb2.StepRequest,
                   deadline: float = DEFAULT_STEP_TIMEOUT_S) -> stage_pb2.StepResponse:
        """Send one step and await its response; other steps may be in flight on the same stream."""
        future = asyncio.get_running_loop().create_future()
        async with self._write_lock:  # the order of `_pending` is the order of writes
            if self._call is None:
                self._open()
            call, pending = self._call, self._pending
            pending.append((request.step_id, future))
            try:
                await call.write(request)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError) as error:
                self._fail(call, pending, error)
        try:
            return await asyncio.wait_for(future, deadline)
        except asyncio.TimeoutError as error:
            self._fail(call, pending, error)
            raise self._unavailable(error) from error

    def _open(self) -> None:
        self._call = self.stub.Step()
        self._pending = collections.deque()
        self._reader = asyncio.get_running_loop().create_task(self._read(self._call, self._pending),
                                                              name=f"step-reader-{self.name}")

    async def _read(self, call, pending: collections.deque) -> None:
        """Hand each response to the oldest step in flight; any failure fails every step in flight."""
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise EOFError("the stage ended its step stream")
                if not pending:
                    raise EOFError(f"the stage answered step {response.step_id}, which was not asked")
                step_id, future = pending[0]
                if response.step_id != step_id:
                    raise EOFError(f"the stage answered step {response.step_id} where {step_id} was due")
                pending.popleft()
                if not future.done():
                    future.set_result(response)
        except asyncio.CancelledError:
            self._fail(call, pending, EOFError("the link was closed"))
            raise
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, EOFError) as error:
            idle = not pending and self._call is call
            self._fail(call, pending, error)
            if idle and self.on_idle_loss is not None and isinstance(self._unavailable(error), StageLost):
                asyncio.get_running_loop().create_task(self.on_idle_loss(self, self._unavailable(error)))

    def _unavailable(self, error: BaseException) -> Unavailable:
        if isinstance(error, grpc.aio.AioRpcError):
            detail, lost = f"{error.code().name}: {error.details()}", _stage_lost(error.code(), error.details())
        elif isinstance(error, DataPlaneError):
            detail, lost = str(error), _stage_lost(error.code, error.details)
        else:  # a deadline, the stream ended, closed or out of turn
            detail, lost = repr(error), isinstance(error, (asyncio.TimeoutError, EOFError, grpc.aio.UsageError))
        return (StageLost if lost else Unavailable)("stage", f"stage {self.name} ({self.address}) failed a step: {detail}")

    def _fail(self, call, pending: collections.deque, error: BaseException) -> None:
        """Drop `call` (if still current) and fail every step in flight on it."""
        if self._call is call and call is not None:
            self._call = None
            call.cancel()
            if self._reader is not None and self._reader is not asyncio.current_task():
                self._reader.cancel()
            self._reader = None
        while pending:
            _, future = pending.popleft()
            if not future.done():
                future.set_exception(self._unavailable(error))

    def _drop_call(self) -> None:
        self._fail(self._call, self._pending, EOFError("the link was closed"))

    async def forward(self, step_id: int, sequences: list, field: str, inputs,
                      deadline: float = DEFAULT_STEP_TIMEOUT_S, greedy: bool = False):
        """One step through this stage. sequences: the step's SequenceSlices; inputs: the step's
        token_ids or hidden_states, as a tensor or as the wire Tensor a previous stage sent (gRPC: passed on undecoded). Returns the stage's
        hidden_states or logits: the wire Tensor as it came (gRPC) or a tensor (shared memory, copied out),
        None when the stage refused every sequence; and the stage's StepResponse.refused. With `greedy`
        a last stage answers GreedyTokens (StepResponse.greedy_token_ids) instead of logits."""
        shm = await self.data_planes.get(self.address, self.channel) if self.data_planes else None
        if shm is None:
            message = inputs if isinstance(inputs, tensor_pb2.Tensor) else codec.encode(inputs, arena=None)
            response = await self.step(_step_request(step_id, sequences, field, message, greedy), deadline)
            if greedy and response.greedy_token_ids:
                return GreedyTokens(list(response.greedy_token_ids)), list(response.refused)
            name = "logits" if response.HasField("logits") else "hidden_states" if response.HasField("hidden_states") else ""
            return (getattr(response, name) if name else None), list(response.refused)
        try:
            async with shm.session() as call:
                tensor = inputs if isinstance(inputs, torch.Tensor) else codec.decode(inputs, field, segment=None)
                request = _step_request(step_id, sequences, field, call.encode(tensor), greedy)
                response = await call.invoke(STEP_METHOD, request, stage_pb2.StepResponse, deadline)
                if response.step_id != step_id:
                    raise EOFError(f"the stage answered step {response.step_id} where {step_id} was due")
                if greedy and response.greedy_token_ids:
                    return GreedyTokens(list(response.greedy_token_ids)), list(response.refused)
                name = "logits" if response.HasField("logits") else "hidden_states" if response.HasField("hidden_states") else ""
                return (call.decode(getattr(response, name), name) if name else None), list(response.refused)
        except (DataPlaneError, RequestError, EOFError) as error:
            raise self._unavailable(error) from error

    async def free(self, sequence_ids: list[int]) -> None:
        try:
            await self.stub.FreeSequences(stage_pb2.FreeSequencesRequest(sequence_ids=sequence_ids),
                                          timeout=CONTROL_DEADLINE_S)
        except grpc.aio.AioRpcError as error:
            log.warning("freeing %d sequences on %s failed: %s", len(sequence_ids), self.name, error.code().name)

    async def reset(self) -> None:
        """Free whatever sequences the server holds: it is joining this position, so any KV cache
        it has is stale (a standby that once was active, a frozen server that came back)."""
        try:
            info = await self.stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=CONTROL_DEADLINE_S)
            if info.cached_sequence_ids:
                log.warning("%s (%s) joins with %d stale sequences cached: freeing them", self.name, self.address,
                            len(info.cached_sequence_ids))
                await self.free(list(info.cached_sequence_ids))
        except grpc.aio.AioRpcError as error:  # its first step will tell whether it is alive
            log.warning("asking %s (%s) what it caches failed: %s", self.name, self.address, error.code().name)

    async def close(self) -> None:
        self._drop_call()
        await self.channel.close()
