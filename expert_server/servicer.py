"""ExpertServicer: decodes token groups, checks them, and runs one matmul chain per expert."""

import grpc
import torch

from shardmesh import codec
from shardmesh.errors import InvalidArgument, NotFound
from shardmesh.expert_model import ExpertShard
from shardmesh.grpc_util import translate_errors
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    def __init__(self, name: str, shard: ExpertShard, dtype: torch.dtype):
        self.name = name
        self.shard = shard
        self.dtype = dtype
        self.hidden_size = shard.config.hidden_size
        self.layers = {layer for layer, _ in shard.experts}
        self.tokens_computed = 0

    def _decode_group(self, index: int, group: expert_pb2.ExpertGroup) -> torch.Tensor:
        field = f"groups[{index}]"
        if group.layer not in self.layers:
            raise NotFound(f"{field}.layer", f"{self.name} holds no expert of layer {group.layer}")
        if not self.shard.holds(group.layer, group.expert):
            raise NotFound(f"{field}.expert", f"(layer {group.layer}, expert {group.expert}) is not held by {self.name}")
        hidden_states = codec.decode(group.hidden_states, f"{field}.hidden_states")
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            raise InvalidArgument(f"{field}.hidden_states",
                                  f"shape {list(hidden_states.shape)} is not [num_tokens, {self.hidden_size}]")
        if hidden_states.dtype != self.dtype:
            raise InvalidArgument(f"{field}.hidden_states", f"dtype {hidden_states.dtype} is not {self.dtype}")
        return hidden_states

    @translate_errors
    async def ComputeExperts(self, request, context):
        # Decode and check every group before computing any, so a bad group costs nothing.
        inputs = [self._decode_group(i, group) for i, group in enumerate(request.groups)]
        outputs = []
        for group, hidden_states in zip(request.groups, inputs):
            outputs.append(codec.encode(self.shard.compute(group.layer, group.expert, hidden_states)))
            self.tokens_computed += hidden_states.shape[0]
        return expert_pb2.ComputeExpertsResponse(outputs=outputs)

    async def GetExpertInfo(self, request, context):
        keys = [router_pb2.ExpertKey(layer=layer, expert=expert) for layer, expert in self.shard.experts]
        return expert_pb2.ExpertInfo(name=self.name, experts=keys)
