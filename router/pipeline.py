"""StagePipeline: runs batch steps through every stage over long-lived Step streams.

Hidden states travel from one stage's response into the next stage's request as they came
(bytes are not decoded at the router); only the last stage's logits are decoded. Several steps
(micro-batches) may be in flight at once: each link writes them on its stream in call order and a
reader task hands the responses, which come back in the same order, to their callers.

A stage that stops answering (its stream breaks, a step passes its deadline) raises `StageLost`;
the pipeline hands it to `on_stage_lost` (router/failover.py), which may switch the position to
a standby (`connect` with its address: a new `epoch`, and the scheduler replays every running
sequence) or mark the pipeline `broken` (no server left for those layers: every step fails
UNAVAILABLE at once)."""

import asyncio
import collections
import itertools
import logging
import time

import grpc
import torch

from shardmesh import codec
from shardmesh.errors import RequestError, Unavailable
from shardmesh.grpc_util import CONTROL_DEADLINE_S, open_channel
from shardmesh.sequence import KVLost, SequenceSlice
from shardmesh.data_planes import DataPlanes
from shardmesh.shm_plane import DataPlaneError
from shardmesh.step_refusals import SequencesRefused, refusal_error
from shardmesh.telemetry import metrics, tracing
from shardmesh.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)
# A step's deadline at each stage scales with its work: a base (the router's --step-timeout) plus
# this per token of the step. Past it the stage is taken for frozen (probed, then dropped).
DEFAULT_STEP_TIMEOUT_S = 10.0
STEP_SECONDS_PER_TOKEN = 0.05
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
                      deadline: float = DEFAULT_STEP_TIMEOUT_S):
        """One step through this stage. inputs: the step's token_ids or hidden_states, as a tensor or
        as the wire Tensor a previous stage sent (gRPC: passed on undecoded). Returns the stage's
        hidden_states or logits: the wire Tensor as it came (gRPC) or a tensor (shared memory, copied out),
        None when the stage refused every sequence; and the stage's StepResponse.refused."""
        shm = await self.data_planes.get(self.address, self.channel) if self.data_planes else None
        if shm is None:
            message = inputs if isinstance(inputs, tensor_pb2.Tensor) else codec.encode(inputs, arena=None)
            response = await self.step(stage_pb2.StepRequest(step_id=step_id, sequences=sequences, **{field: message},
                                                             traceparent=tracing.current_traceparent()), deadline)
            name = "logits" if response.HasField("logits") else "hidden_states" if response.HasField("hidden_states") else ""
            return (getattr(response, name) if name else None), list(response.refused)
        try:
            async with shm.session() as call:
                tensor = inputs if isinstance(inputs, torch.Tensor) else codec.decode(inputs, field, segment=None)
                request = stage_pb2.StepRequest(step_id=step_id, sequences=sequences, **{field: call.encode(tensor)},
                                                traceparent=tracing.current_traceparent())
                response = await call.invoke(STEP_METHOD, request, stage_pb2.StepResponse, deadline)
                if response.step_id != step_id:
                    raise EOFError(f"the stage answered step {response.step_id} where {step_id} was due")
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


class StagePipeline:
    def __init__(self, security=None, data_plane: str = "grpc", step_timeout: float = DEFAULT_STEP_TIMEOUT_S):
        self.security = security  # shardmesh.security.Security of the router's outgoing channels
        self.data_planes = DataPlanes(enabled=data_plane == "shm")
        self.links: list[StageLink] = []
        self._step_ids = itertools.count(1)
        self.step_timeout = step_timeout  # s per step at each stage, plus STEP_SECONDS_PER_TOKEN per token
        self.epoch = 0     # +1 whenever a stage position gets another server: KV caches there are gone
        self.broken = ""   # why no step can go through (a stage has no server), "" = it can
        # async (link, StageLost, epoch) -> None: decides whether the stage is gone (router/failover.py)
        self.on_stage_lost = None

    def _new_link(self, name: str, address: str) -> StageLink:
        link = StageLink(name, address, self.security, self.data_planes)
        link.on_idle_loss = lambda lost_link, error: self._lost(lost_link, error, self.epoch)
        return link

    async def _lost(self, link: StageLink, error: StageLost, epoch: int) -> None:
        if self.on_stage_lost is not None:
            await self.on_stage_lost(link, error, epoch)

    async def connect(self, stages: list[tuple[str, str]]) -> None:
        """(name, address) of each stage in order; reopens links whose address changed."""
        before = {link.address for link in self.links}
        old = {link.name: link for link in self.links}
        links = []
        for name, address in stages:
            link = old.pop(name, None)
            if link is None or link.address != address:
                if link is not None:
                    await link.close()
                    self.epoch += 1  # a restarted or other server: it has none of the KV caches
                link = self._new_link(name, address)
                await link.reset()
            links.append(link)
        for link in old.values():
            await link.close()
            self.epoch += 1
        self.links = links
        await self.data_planes.forget(before - {link.address for link in links})

    async def step(self, slices: list[SequenceSlice], token_ids: torch.Tensor) -> torch.Tensor:
        step_id = next(self._step_ids)
        sequences = [stage_pb2.SequenceSlice(sequence_id=s.sequence_id, start_position=s.start_position,
                                             num_tokens=s.num_tokens) for s in slices]
        payload, field = token_ids, "token_ids"
        epoch, links = self.epoch, self.links
        deadline = self.step_timeout + STEP_SECONDS_PER_TOKEN * token_ids.shape[0]
        live, refused = list(range(len(slices))), {}  # slices still in the step; index -> its RequestError
        metrics.BATCH_SEQUENCES.labels("router").observe(len(slices))
        metrics.BATCH_TOKENS.labels("router").observe(token_ids.shape[0])
        with tracing.router_step([s.sequence_id for s in slices]):  # a no-op unless tracing is on
            for link in links:
                self._check(epoch)
                started, sent = time.perf_counter(), metrics.tensor_bytes(payload)
                try:
                    payload, refusals = await link.forward(step_id, sequences, field, payload, deadline)
                except StageLost as error:
                    await self._lost(link, error, epoch)
                    self._check(epoch)  # replaced: KVLost; no server left: why
                    raise
                if refusals:  # shardmesh/step_refusals.py: these leave the step, the others go on
                    live, sequences = self._refused(link, refusals, live, sequences, refused)
                    if not live:
                        raise SequencesRefused(refused, None)
                metrics.data_plane_call("router", "router_stage", link.name, started, sent, metrics.tensor_bytes(payload))
                field = "hidden_states"
        if refused:
            raise SequencesRefused(refused, payload if isinstance(payload, torch.Tensor)
                                   else codec.decode(payload, "logits", segment=None))  # [B', V]
        if isinstance(payload, torch.Tensor):
            return payload  # [B, V]
        return codec.decode(payload, "logits", segment=None)  # [B, V]

    @staticmethod
    def _refused(link: StageLink, refusals: list, live: list[int], sequences: list, refused: dict):
        """Record `link`'s refusals (indices into `sequences`) in `refused` (by index into the step's
        slices); return the live indices and sequences left."""
        out = {r.index for r in refusals}
        if len(out) != len(refusals) or max(out) >= len(sequences):
            raise Unavailable("stage", f"stage {link.name} ({link.address}) refused sequences "
                                       f"{sorted(out)} of a step of {len(sequences)}")
        for r in refusals:
            refused[live[r.index]] = refusal_error(link.name, r.code, r.field, r.message)
        keep = [j for j in range(len(sequences)) if j not in out]
        return [live[j] for j in keep], [sequences[j] for j in keep]

    def _check(self, epoch: int) -> None:
        if self.broken:
            raise Unavailable("stage", f"the mesh cannot serve: {self.broken}")
        if self.epoch != epoch:
            raise KVLost(f"a stage was replaced (pipeline epoch {epoch} -> {self.epoch})")

    async def free(self, sequence_ids: list[int]) -> None:
        if sequence_ids:
            await asyncio.gather(*(link.free(sequence_ids) for link in self.links))

    async def close(self) -> None:
        for link in self.links:
            await link.close()
        await self.data_planes.close()
