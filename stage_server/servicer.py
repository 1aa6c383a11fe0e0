"""StageServicer: translates StepRequests into StageBatches for the StageModel and back."""

import asyncio

import torch

from shardmesh import codec
from shardmesh.errors import FailedPrecondition, InvalidArgument, RequestError
from shardmesh.grpc_util import abort_for, translate_errors
from shardmesh.stage_model import StageBatch, StageModel
from shardmesh.telemetry import metrics, tracing
from shardmesh.v1 import router_pb2, stage_pb2, stage_pb2_grpc

from stage_server.remote_experts import Placement, RemoteExperts
from stage_server.tp_link import TPFanout, tp_step


class StageServicer(stage_pb2_grpc.StageServicer):
    def __init__(self, name: str, model: StageModel, experts: RemoteExperts):
        self.name = name
        self.model = model
        self.experts = experts
        experts.server_name = name  # labels its metrics
        metrics.watch_stage(name, model)  # KV cache use, read at scrape time
        self.step_lock = asyncio.Lock()  # one step at a time mutates the KV cache
        self.tp_fanout: TPFanout | None = None  # rank 0 of a tensor-parallel stage: its other shards
        self.placement_ready = asyncio.Event()
        if not model.config.is_moe:
            self.placement_ready.set()

    def _batch(self, request: stage_pb2.StepRequest) -> StageBatch:
        if not request.sequences:
            raise InvalidArgument("sequences", "a step needs at least one sequence")
        if self.model.is_first:
            if not request.HasField("token_ids"):
                raise InvalidArgument("token_ids", f"the first stage ({self.name}) takes token_ids")
            inputs = codec.decode(request.token_ids, "token_ids")
        else:
            if not request.HasField("hidden_states"):
                raise InvalidArgument("hidden_states", f"stage {self.name} takes hidden_states")
            inputs = codec.decode(request.hidden_states, "hidden_states")
        return StageBatch(
            sequence_ids=[s.sequence_id for s in request.sequences],
            start_positions=[s.start_position for s in request.sequences],
            num_tokens=[s.num_tokens for s in request.sequences],
            inputs=inputs,
        )

    async def Step(self, request_iterator, context):
        async for request in request_iterator:
            try:
                batch = self._batch(request)
                if not self.placement_ready.is_set():
                    raise FailedPrecondition("placement", f"stage {self.name} has no expert placement yet")
                async with self.step_lock:
                    with tracing.server_span("stage.step", request.traceparent, self.name):  # no-op when off
                        output = await tp_step(self.tp_fanout, request, self.model, batch, self.experts)
            except RequestError as error:
                await abort_for(context, error)
                return
            if self.model.is_last:
                yield stage_pb2.StepResponse(step_id=request.step_id, logits=codec.encode(output))
            else:
                yield stage_pb2.StepResponse(step_id=request.step_id, hidden_states=codec.encode(output))

    @translate_errors
    async def FreeSequences(self, request, context):
        async with self.step_lock:
            freed = self.model.free(request.sequence_ids)
            if self.tp_fanout is not None:
                await self.tp_fanout.free(request)
        return stage_pb2.FreeSequencesResponse(freed=freed)

    @translate_errors
    async def UpdatePlacement(self, request, context):
        replicas: dict[tuple[int, int], tuple[str, ...]] = {}
        for i, location in enumerate(request.locations):
            if not location.addresses:
                raise InvalidArgument(f"locations[{i}].addresses", "an expert needs at least one address")
            replicas[(location.layer, location.expert)] = tuple(location.addresses)
        config = self.model.config
        missing = [(l, e) for l in range(self.model.start_layer, self.model.end_layer)
                   for e in range(config.num_experts) if (l, e) not in replicas]
        if missing:
            raise FailedPrecondition("locations", f"no address for {missing[:4]} of stage {self.name}")
        if request.version < self.experts.placement.version:
            raise FailedPrecondition("version", f"{request.version} is older than {self.experts.placement.version}")
        async with self.step_lock:
            self.experts.update(Placement(request.version, replicas))
            if self.tp_fanout is not None:
                await self.tp_fanout.update_placement(request)
        self.placement_ready.set()
        return stage_pb2.UpdatePlacementResponse(version=request.version)

    async def GetStageInfo(self, request, context):
        return stage_pb2.StageInfo(
            name=self.name,
            layers=router_pb2.LayerRange(start=self.model.start_layer, end=self.model.end_layer),
            is_first=self.model.is_first, is_last=self.model.is_last,
            cached_sequence_ids=self.model.cached_sequence_ids(),
            placement_version=self.experts.placement.version,
        )
