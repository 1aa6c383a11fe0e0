"""StageServicer: translates StepRequests into StageBatches for the StageModel and back."""

import asyncio
import contextlib

import torch

from shardmesh import codec
from shardmesh.errors import FailedPrecondition, InvalidArgument, RequestError
from shardmesh.grpc_util import abort_for, translate_errors
from shardmesh.sampling import GreedyTokens, greedy_token_ids
from shardmesh.stage_model import StageBatch, StageModel
from shardmesh.telemetry import metrics, tracing
from shardmesh.v1 import router_pb2, stage_pb2, stage_pb2_grpc

from stage_server.capacity import split_over_capacity
from stage_server.remote_experts import Placement, RemoteExperts
from stage_server.sequence_history import SequenceHistory
from stage_server.split_experts import SliceReplicas, SplitExperts, slice_replicas
from stage_server.step_gate import READ_AHEAD, StepGate, read_ahead
from stage_server.tp_fanout import TPFanout
from stage_server.tp_link import tp_step


MAX_PLACEMENT_VERSION = 2**63  # placement versions stay far from uint64's end (routers add 1)


def check_address(address: str, field: str) -> str:
    """host:port of an expert server, from the network: refused (naming `field`) unless the host is
    printable ASCII without spaces and the port in [1, 65535] (grpc cannot even open a channel to
    some malformed targets)."""
    host, _, port = address.rpartition(":")
    if (not host or not host.isascii() or not host.isprintable() or " " in host or "/" in host
            or not port.isdigit() or not 0 < int(port) < 65536):
        raise InvalidArgument(field, f"{address[:80]!r} is not host:port with a port in [1, 65535]")
    return address


class StageServicer(stage_pb2_grpc.StageServicer):
    def __init__(self, name: str, model: StageModel, experts: RemoteExperts):
        self.name = name
        self.model = model
        self.experts = experts
        experts.server_name = name  # labels its metrics
        self.backend = SplitExperts(experts, experts.security)  # + experts split over servers (split_experts.py)
        metrics.watch_stage(name, model)  # KV cache use, read at scrape time
        self.gate = StepGate()  # which steps may run at once: disjoint sequences do (step_gate.py)
        self.tp_fanout: TPFanout | None = None  # rank 0 of a tensor-parallel stage: its other shards
        self.host_id = ""  # StageInfo.host_id (set by stage_server.main)
        self.not_serving_reason = ""  # StageInfo.not_serving_reason: set when a TP group fails to form or breaks
        self.history = SequenceHistory()  # StageInfo.sequence_history: what it received of each sequence
        self.placement_ready = asyncio.Event()
        self.last_placement: stage_pb2.ExpertPlacement | None = None  # TP rank 0 gives it to re-formed shards
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
        sequence_ids, start_positions, num_tokens = [], [], []
        for piece in request.sequences:  # one pass over the messages (every step)
            sequence_ids.append(piece.sequence_id)
            start_positions.append(piece.start_position)
            num_tokens.append(piece.num_tokens)
        return StageBatch(sequence_ids=sequence_ids, start_positions=start_positions, num_tokens=num_tokens,
                          inputs=inputs, greedy=self.model.is_last and request.greedy_token_ids)

    async def Step(self, request_iterator, context):
        """Bidi stream: one response per request, in request order, the stream ending with the first
        error. Steps of one stream are read ahead (up to READ_AHEAD in flight) and run concurrently
        where their sequences are disjoint (StepGate); several streams (or shared-memory sessions)
        likewise."""
        async with contextlib.aclosing(read_ahead(request_iterator, self._step, READ_AHEAD)) as steps:
            async for request, step in steps:
                try:
                    output, refused = await step
                except RequestError as error:
                    await abort_for(context, error)
                    return
                response = stage_pb2.StepResponse(step_id=request.step_id, refused=refused)
                if isinstance(output, GreedyTokens):  # the greedy head chose them (batch.greedy)
                    response.greedy_token_ids.extend(output.token_ids)
                elif output is not None and self.model.is_last and request.greedy_token_ids:
                    response.greedy_token_ids.extend(greedy_token_ids(output))  # [S, V] -> [S]
                elif output is not None:  # None: every sequence was refused
                    (response.logits if self.model.is_last else response.hidden_states).CopyFrom(codec.encode(output))
                yield response

    async def _step(self, request: stage_pb2.StepRequest) -> tuple[torch.Tensor | None, list]:
        """The step's output ([N, H] hidden states, or logits [S, V] on the last stage) and the
        sequences refused on their own (stage_server/capacity.py; the output omits their rows)."""
        batch = self._batch(request)
        if not self.placement_ready.is_set():
            raise FailedPrecondition("placement", f"stage {self.name} has no expert placement yet")
        # A tensor-parallel stage's ranks must run the same steps in the same order: one at a time.
        serial = self.tp_fanout is not None or self.model.tp.world_size > 1
        # Rank 0 refuses sequences on their own and forwards the rest; a shard runs what rank 0 sent.
        splits = self.tp_fanout is not None or self.model.tp.world_size == 1
        async with self.gate.exclusive() if serial else self.gate.sequences(batch.sequence_ids):
            batch, refused = split_over_capacity(self.model, batch) if splits else (batch, [])
            if batch is None:
                return None, refused
            if refused:
                out = {r.index for r in refused}
                request = stage_pb2.StepRequest(step_id=request.step_id, traceparent=request.traceparent, sequences=[
                    s for i, s in enumerate(request.sequences) if i not in out])  # what the shards get
            with tracing.server_span("stage.step", request.traceparent, self.name):  # no-op when off
                output = await tp_step(self.tp_fanout, request, self.model, batch, self.backend)
            self.history.stepped(batch.sequence_ids, batch.start_positions, batch.num_tokens)  # (the kept ones)
        return output, refused

    @translate_errors
    async def FreeSequences(self, request, context):
        # After the steps admitted before it on these sequences (all steps when the shards must follow).
        async with self.gate.exclusive() if self.tp_fanout is not None else self.gate.sequences(request.sequence_ids):
            cached = set(self.model.cached_sequence_ids())
            self.history.freed([i for i in request.sequence_ids if i in cached])
            freed = self.model.free(request.sequence_ids)
            if self.tp_fanout is not None:
                await self.tp_fanout.free(request)
        return stage_pb2.FreeSequencesResponse(freed=freed)

    @translate_errors
    async def UpdatePlacement(self, request, context):
        replicas: dict[tuple[int, int], tuple[str, ...]] = {}
        slices: dict[tuple[int, int], SliceReplicas] = {}  # split experts: replicas of slice 0, 1, ...
        for i, location in enumerate(request.locations):
            if location.slice_addresses or location.slice_replicas:
                slices[(location.layer, location.expert)] = slice_replicas(location, f"locations[{i}]", check_address)
                continue
            if not location.addresses:
                raise InvalidArgument(f"locations[{i}].addresses", "an expert needs at least one address")
            replicas[(location.layer, location.expert)] = tuple(
                check_address(a, f"locations[{i}].addresses[{j}]") for j, a in enumerate(location.addresses))
        config = self.model.config
        missing = [(l, e) for l in range(self.model.start_layer, self.model.end_layer)
                   for e in range(config.num_experts) if (l, e) not in replicas and (l, e) not in slices]
        if missing:
            raise FailedPrecondition("locations", f"no address for {missing[:4]} of stage {self.name}")
        if request.version >= MAX_PLACEMENT_VERSION:  # a router numbers the next placement after it
            raise InvalidArgument("version", f"{request.version} is not below 2**63")
        if request.version < self.experts.placement.version:
            raise FailedPrecondition("version", f"{request.version} is older than {self.experts.placement.version}")
        async with self.gate.exclusive():  # no step in flight while the placement switches
            await self.experts.update(Placement(request.version, replicas))
            self.backend.update(slices)
            if self.tp_fanout is not None:
                await self.tp_fanout.update_placement(request)
            self.last_placement = request
        self.placement_ready.set()
        return stage_pb2.UpdatePlacementResponse(version=request.version)

    async def GetStageInfo(self, request, context):
        return stage_pb2.StageInfo(
            name=self.name,
            layers=router_pb2.LayerRange(start=self.model.start_layer, end=self.model.end_layer),
            is_first=self.model.is_first, is_last=self.model.is_last,
            cached_sequence_ids=self.model.cached_sequence_ids(),
            placement_version=self.experts.placement.version,
            host_id=self.host_id,
            tp_all_reduce=getattr(self.model.tp, "backend", ""),
            not_serving_reason=self.not_serving_reason,
            sequence_history=self.history.messages(),
        )
