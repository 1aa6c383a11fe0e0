"""One expert server's pieces of a layer as one packed tensor (expert.proto PackedGroups), and its
answer back into one output per piece: per call one tensor to encode, move and decode each way,
instead of one per group.

Shape legend: n_i rows of piece i, N = sum of n_i, H hidden_size.
"""

import torch

from shardmesh import codec
from shardmesh.errors import RequestError, Unavailable
from shardmesh.models.packed_rows import PackedRows
from shardmesh.telemetry import tracing
from shardmesh.v1 import expert_pb2


def joined(inputs: list[torch.Tensor]) -> torch.Tensor:
    """inputs [n_i, H] as one tensor [N, H]: a view when they lie back to back in one storage, in
    order (the groups of MoEGate.dispatch's kernel path, views of its packed tensor), else a copy."""
    first = inputs[0]
    if len(inputs) == 1:
        return first
    storage, address, width = first.untyped_storage().data_ptr(), first.data_ptr(), first.shape[-1]
    for x in inputs:
        if (x.dim() != 2 or x.data_ptr() != address or not x.is_contiguous() or x.shape[1] != width
                or x.dtype != first.dtype or x.untyped_storage().data_ptr() != storage):
            return torch.cat(inputs)
        address += x.numel() * x.element_size()
    rows, base = sum(x.shape[0] for x in inputs), first._base
    if (base is not None and base.data_ptr() == first.data_ptr() and base.shape == (rows, width)
            and base.dtype == first.dtype and base.is_contiguous()):
        return base  # the inputs are all of the tensor they are views of (no new view: a tensor op costs ~30 us cold)
    return first.as_strided((rows, width), (width, 1))


class PackedCall:
    """The request and answer check of one ComputeExperts call carrying `inputs` of `experts` of `layer`."""

    __slots__ = ("address", "layer", "experts", "counts", "hidden_states")

    def __init__(self, address: str, layer: int, experts: list[int], inputs: list[torch.Tensor]):
        self.address, self.layer, self.experts = address, layer, experts
        self.counts = [x.shape[0] for x in inputs]                           # n_i
        self.hidden_states = joined(inputs)                                  # [N, H]

    @classmethod
    def of_rows(cls, address: str, layer: int, groups: PackedRows) -> "PackedCall":
        """The call carrying every group of `groups` (MoEGate.dispatch's): its packed tensor as it is."""
        call = cls.__new__(cls)
        call.address, call.layer, call.experts, call.counts = address, layer, groups.experts, groups.counts
        call.hidden_states = groups.rows                                     # [N, H]
        return call

    def request(self, encode, placed: tuple[int, int] | None = None) -> expert_pb2.ComputeExpertsRequest:
        """`encode`: the data plane's (tensor -> wire Tensor). placed: where the packed tensor lies
        already in the call's shared-memory segment, (offset, length) (Lent.rows: dispatched there),
        sent as it lies without `encode`. Built in place (no submessage made and copied)."""
        request = expert_pb2.ComputeExpertsRequest()
        packed = request.packed
        packed.layer = self.layer  # (present even at layer 0: any field set makes it so)
        packed.experts.extend(self.experts)
        packed.num_tokens.extend(self.counts)
        if placed is not None:
            codec.encode_into(packed.hidden_states, self.hidden_states, placed)
        else:
            packed.hidden_states.CopyFrom(encode(self.hidden_states))
        traceparent = tracing.current_traceparent()
        if traceparent:
            request.traceparent = traceparent
        return request

    def outputs(self, reply: expert_pb2.ComputeExpertsResponse, decode) -> list[torch.Tensor]:
        """The reply -> one output [n_i, H] per input (views of one tensor), each of its input's shape
        and dtype; Unavailable naming the server otherwise (a bad answer is the server's failure).
        `decode`: the data plane's (wire Tensor, field -> tensor that outlives the call)."""
        output = self.output(reply, decode)  # [N, H]
        return list(output.split_with_sizes(self.counts)) if len(self.counts) > 1 else [output]

    def output(self, reply: expert_pb2.ComputeExpertsResponse, decode) -> torch.Tensor:
        """The reply -> the outputs of every input as one tensor [N, H] (the inputs' packed shape and
        dtype, checked as `outputs` does)."""
        if not reply.HasField("packed_outputs"):
            raise Unavailable("experts", f"expert server {self.address} answered no packed_outputs to packed groups "
                                         "(a server older than this stage? upgrade expert servers before stages)")
        try:
            output = decode(reply.packed_outputs, "packed_outputs")  # [N, H]
        except RequestError as error:
            raise Unavailable("experts", f"expert server {self.address} sent a bad tensor: {error}") from error
        x = self.hidden_states
        if output.shape != x.shape or output.dtype != x.dtype:
            raise Unavailable("experts", f"expert server {self.address} answered {list(output.shape)} "
                                         f"{output.dtype} for {list(x.shape)} {x.dtype}")
        return output
