"""ExpertServicer: decodes token groups, checks them, and runs one matmul chain per expert."""

import logging

import torch

from shardmesh import codec
from shardmesh.compute_pool import parallel_map
from shardmesh.errors import InvalidArgument, NotFound, Unavailable
from shardmesh.expert_model import ExpertShard, PackedPlan
from shardmesh.grpc_util import translate_errors
from shardmesh.nccl_dispatch import serves_nccl_calls
from shardmesh.telemetry import metrics, tracing
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2

from expert_server.load import ExpertLoadMeter
from expert_server.placement_rpcs import ExpertPlacementRpcs

log = logging.getLogger(__name__)
MAX_KEPT_REPLIES = 64  # responses kept by reply span (shared-memory plane): a session's calls reuse a few


class ExpertServicer(ExpertPlacementRpcs, expert_pb2_grpc.ExpertServicer):
    def __init__(self, name: str, shard: ExpertShard, dtype: torch.dtype, model_dir=None):
        self.name = name
        self.shard = shard
        self.dtype = dtype
        self.hidden_size = shard.config.hidden_size
        self._on_cpu = shard.device.type == "cpu"
        # _decode_packed checks rows of this dtype: when it is the shard's, the kernel need not check again
        self._rows_checked = dtype == shard.dtype
        # (offset, length) of a reply in the call's shared-memory segment -> the response naming it
        # (dtype and H are this server's, so the span says the shape): _compute_packed's, made once each
        self._replies: dict[tuple[int, int], expert_pb2.ComputeExpertsResponse] = {}
        self.tokens_computed = 0
        self.meter = ExpertLoadMeter()  # load accounting and drains (placement_rpcs.py)
        metrics.watch_expert(name, self.meter)  # per-expert tokens and busy time, read at scrape time
        self.model_dir = model_dir      # where LoadExperts reads new experts; None = cannot load
        self.nccl = None  # nccl_plane.NcclEndpoint: the links stages formed with this server (nccl data plane)
        # Why ComputeExperts answers UNAVAILABLE ("" = it computes): set while a server started with a
        # router has not been placed by it yet (expert_server/main.py). A replica restarted at the
        # address of one the router placed live may be called by stages before it has loaded what the
        # router assigns it; UNAVAILABLE sends those rows to other replicas (stage failover).
        self.unplaced_reason = ""
        self.assignment_file = None  # expert_server/assignment_file.py: what it holds, kept on disk

    def holdings_changed(self) -> None:
        """After experts were loaded or dropped: record what it holds now (when an assignment file is kept)."""
        if self.assignment_file is None:
            return
        try:
            self.assignment_file.write(self.shard.experts)
        except OSError as error:  # the experts are loaded all the same; only a restart would miss them
            log.warning("%s: cannot write the assignment file %s: %s", self.name, self.assignment_file.path, error)

    @property
    def layers(self) -> set[int]:
        return {layer for layer, _ in self.shard.experts}

    def _decode_group(self, index: int, group: expert_pb2.ExpertGroup) -> torch.Tensor:
        field = f"groups[{index}]"
        if group.slice_count or group.slice_rank:  # a slice of a split expert (shardmesh.split_expert)
            if not self.shard.holds_slice(group.layer, group.expert, group.slice_rank, group.slice_count):
                raise NotFound(f"{field}.slice_rank", f"slice {group.slice_rank} of {group.slice_count} of (layer "
                               f"{group.layer}, expert {group.expert}) is not held by {self.name}")
        else:
            self._check_held(group.layer, group.expert, f"{field}.layer", f"{field}.expert")
        return self._checked(codec.decode(group.hidden_states, f"{field}.hidden_states"), f"{field}.hidden_states")

    def _decode_packed(self, packed: expert_pb2.PackedGroups) -> tuple[PackedPlan, list[int], torch.Tensor]:
        """A layer's packed groups -> (their experts' plan, the counts, their rows [N, H]), checked
        (counts, experts held, shape, dtype)."""
        if len(packed.num_tokens) != len(packed.experts):
            raise InvalidArgument("packed.num_tokens", f"{len(packed.num_tokens)} counts for "
                                                       f"{len(packed.experts)} experts")
        plan = self.shard.packed_plan(packed.layer, packed.experts)  # (remembered: made once per list)
        if plan is None:
            for i, expert in enumerate(packed.experts):
                self._check_held(packed.layer, expert, "packed.layer", f"packed.experts[{i}]")
        hidden_states = self._checked(codec.decode(packed.hidden_states, "packed.hidden_states"),
                                      "packed.hidden_states")  # [N, H]
        counts = list(packed.num_tokens)
        total = sum(counts)
        if total != hidden_states.shape[0]:
            raise InvalidArgument("packed.num_tokens", f"they sum to {total}, not to the {hidden_states.shape[0]} "
                                                       f"rows of packed.hidden_states")
        return plan, counts, hidden_states

    def _check_held(self, layer: int, expert: int, layer_field: str, expert_field: str) -> None:
        if not self.shard.holds(layer, expert):  # (the set of layers is built on this error path only)
            if layer not in self.layers:
                raise NotFound(layer_field, f"{self.name} holds no expert of layer {layer}")
            raise NotFound(expert_field, f"(layer {layer}, expert {expert}) is not held by {self.name}")

    def _checked(self, hidden_states: torch.Tensor, field: str) -> torch.Tensor:
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            raise InvalidArgument(field, f"shape {list(hidden_states.shape)} is not [num_tokens, {self.hidden_size}]")
        if hidden_states.dtype != self.dtype:
            raise InvalidArgument(field, f"dtype {hidden_states.dtype} is not {self.dtype}")
        return hidden_states

    @translate_errors
    @serves_nccl_calls  # tensors over the caller's NCCL link when its metadata names one (self.nccl)
    async def ComputeExperts(self, request, context):
        if self.unplaced_reason:
            raise Unavailable("groups", f"{self.name}: {self.unplaced_reason}")
        # Decode and check every group before computing any, so a bad group costs nothing.
        if request.HasField("packed"):  # one tensor in, one out (what stages send)
            if request.groups:
                raise InvalidArgument("packed", "give groups or packed, not both")
            return self._compute_packed(request.packed, request.traceparent)
        inputs = [self._decode_group(i, group) for i, group in enumerate(request.groups)]
        work = [(g.layer, g.expert, g.slice_count, x) for g, x in zip(request.groups, inputs)]
        outputs = self._compute_all(work, request.traceparent)
        return expert_pb2.ComputeExpertsResponse(outputs=[codec.encode(output) for output in outputs])

    def _compute_packed(self, packed: expert_pb2.PackedGroups, traceparent: str) -> expert_pb2.ComputeExpertsResponse:
        """Packed groups -> the response of their outputs [N, H], row for row. On the CPU computed in
        place into the reply (codec.claim_reply: on the shared-memory plane the reply arena, so nothing
        is copied) and the response built around it in place: on that plane one response per reply
        span, made once and returned again (it names only the span, dtype and shape; never mutated)."""
        plan, counts, hidden_states = self._decode_packed(packed)  # [N, H]
        if not self._on_cpu:  # device tensors: as one group each (the reply from the device)
            response = expert_pb2.ComputeExpertsResponse()
            outputs = self._compute_all([(packed.layer, expert, 0, x) for expert, x in
                                         zip(plan.experts, hidden_states.split_with_sizes(counts))], traceparent)
            codec.encode_into(response.packed_outputs, torch.cat(outputs) if outputs
                              else hidden_states.new_empty(0, self.hidden_size))
            return response
        output, placed = codec.claim_reply(hidden_states.shape, self.dtype)  # [N, H]
        # Computed without yielding to the event loop, so no drain can find these experts in use
        # meanwhile: the meter records the call afterwards, once the reply is on its way.
        meter = self.meter
        start = meter.clock()
        with tracing.server_span("expert.compute", traceparent, self.name):  # no-op when off or untraced
            # (decoded rows and the claimed reply: contiguous on the CPU; their counts summed)
            self.shard.compute_packed(packed.layer, plan.experts, counts, hidden_states, output, plan,
                                      self._rows_checked)
        meter.record_soon(packed.layer, plan.experts, counts, start, meter.clock())
        self.tokens_computed += output.shape[0]
        response = self._replies.get(placed) if placed is not None else None
        if response is None:
            response = expert_pb2.ComputeExpertsResponse()
            codec.encode_into(response.packed_outputs, output, placed)
            if placed is not None:
                if len(self._replies) >= MAX_KEPT_REPLIES:
                    self._replies.clear()
                self._replies[placed] = response
        return response

    def _compute_all(self, work: list[tuple[int, int, int, torch.Tensor]], traceparent: str) -> list[torch.Tensor]:
        """(layer, expert, slice_count, hidden_states [n, H]) each -> its output [n, H], checked already."""
        # Slices of split experts are placed by the topology, not by load: they are not metered.
        metered = [(layer, expert, x.shape[0]) for layer, expert, slices, x in work if not slices]
        with self.meter.computing(metered), \
                tracing.server_span("expert.compute", traceparent, self.name):  # no-op when off
            if any(slices for _, _, slices, _ in work):  # split-expert slices: over the compute threads
                outputs = parallel_map(self._compute, work)
            else:  # whole experts, each cut into pieces over the threads (ExpertShard.compute_many)
                outputs = self.shard.compute_many([(layer, expert, x) for layer, expert, _, x in work])
        self.tokens_computed += sum(x.shape[0] for *_, x in work)
        return outputs

    def _compute(self, work: tuple[int, int, int, torch.Tensor]) -> torch.Tensor:
        layer, expert, slice_count, hidden_states = work
        if slice_count:
            return self.shard.compute_slice(layer, expert, hidden_states)
        return self.shard.compute(layer, expert, hidden_states)

    async def GetExpertInfo(self, request, context):
        keys = [router_pb2.ExpertKey(layer=layer, expert=expert) for layer, expert in self.shard.experts]
        return expert_pb2.ExpertInfo(name=self.name, experts=keys)
