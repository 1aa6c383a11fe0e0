from shardmesh.v1 import router_pb2 as _router_pb2
from shardmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertGroup(_message.Message):
    __slots__ = ("layer", "expert", "hidden_states", "slice_count", "slice_rank")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    SLICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SLICE_RANK_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    hidden_states: _tensor_pb2.Tensor
    slice_count: int
    slice_rank: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., hidden_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., slice_count: _Optional[int] = ..., slice_rank: _Optional[int] = ...) -> None: ...

class PackedGroups(_message.Message):
    __slots__ = ("layer", "experts", "num_tokens", "hidden_states")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden_states: _tensor_pb2.Tensor
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[_Iterable[int]] = ..., hidden_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ComputeExpertsRequest(_message.Message):
    __slots__ = ("groups", "traceparent", "packed")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[ExpertGroup]
    traceparent: str
    packed: PackedGroups
    def __init__(self, groups: _Optional[_Iterable[_Union[ExpertGroup, _Mapping]]] = ..., traceparent: _Optional[str] = ..., packed: _Optional[_Union[PackedGroups, _Mapping]] = ...) -> None: ...

class ComputeExpertsResponse(_message.Message):
    __slots__ = ("outputs", "packed_outputs")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    packed_outputs: _tensor_pb2.Tensor
    def __init__(self, outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., packed_outputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GetExpertInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("name", "experts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    experts: _containers.RepeatedCompositeFieldContainer[_router_pb2.ExpertKey]
    def __init__(self, name: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[_router_pb2.ExpertKey, _Mapping]]] = ...) -> None: ...

class GetExpertLoadRequest(_message.Message):
    __slots__ = ("window_seconds",)
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    window_seconds: float
    def __init__(self, window_seconds: _Optional[float] = ...) -> None: ...

class ExpertTokens(_message.Message):
    __slots__ = ("layer", "expert", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    tokens: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class ExpertLoadReport(_message.Message):
    __slots__ = ("tokens", "busy_seconds", "window_seconds")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[ExpertTokens]
    busy_seconds: float
    window_seconds: float
    def __init__(self, tokens: _Optional[_Iterable[_Union[ExpertTokens, _Mapping]]] = ..., busy_seconds: _Optional[float] = ..., window_seconds: _Optional[float] = ...) -> None: ...

class LoadExpertsRequest(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[_router_pb2.ExpertKey]
    def __init__(self, experts: _Optional[_Iterable[_Union[_router_pb2.ExpertKey, _Mapping]]] = ...) -> None: ...

class DropExpertsRequest(_message.Message):
    __slots__ = ("experts", "drain_timeout_seconds")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[_router_pb2.ExpertKey]
    drain_timeout_seconds: float
    def __init__(self, experts: _Optional[_Iterable[_Union[_router_pb2.ExpertKey, _Mapping]]] = ..., drain_timeout_seconds: _Optional[float] = ...) -> None: ...
