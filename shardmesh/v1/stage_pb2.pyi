from shardmesh.v1 import router_pb2 as _router_pb2
from shardmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SequenceSlice(_message.Message):
    __slots__ = ("sequence_id", "start_position", "num_tokens")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    start_position: int
    num_tokens: int
    def __init__(self, sequence_id: _Optional[int] = ..., start_position: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "sequences", "token_ids", "hidden_states", "traceparent", "greedy_token_ids")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    GREEDY_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceSlice]
    token_ids: _tensor_pb2.Tensor
    hidden_states: _tensor_pb2.Tensor
    traceparent: str
    greedy_token_ids: bool
    def __init__(self, step_id: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceSlice, _Mapping]]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., hidden_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., traceparent: _Optional[str] = ..., greedy_token_ids: _Optional[bool] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step_id", "hidden_states", "logits", "refused", "greedy_token_ids")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    GREEDY_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden_states: _tensor_pb2.Tensor
    logits: _tensor_pb2.Tensor
    refused: _containers.RepeatedCompositeFieldContainer[SequenceRefusal]
    greedy_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., refused: _Optional[_Iterable[_Union[SequenceRefusal, _Mapping]]] = ..., greedy_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SequenceRefusal(_message.Message):
    __slots__ = ("index", "code", "field", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    code: str
    field: str
    message: str
    def __init__(self, index: _Optional[int] = ..., code: _Optional[str] = ..., field: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class FreeSequencesRequest(_message.Message):
    __slots__ = ("sequence_ids",)
    SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    sequence_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sequence_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FreeSequencesResponse(_message.Message):
    __slots__ = ("freed",)
    FREED_FIELD_NUMBER: _ClassVar[int]
    freed: int
    def __init__(self, freed: _Optional[int] = ...) -> None: ...

class ExpertLocation(_message.Message):
    __slots__ = ("layer", "expert", "addresses", "slice_addresses", "slice_replicas")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SLICE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SLICE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    slice_addresses: _containers.RepeatedScalarFieldContainer[str]
    slice_replicas: _containers.RepeatedCompositeFieldContainer[SliceReplicas]
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ..., slice_addresses: _Optional[_Iterable[str]] = ..., slice_replicas: _Optional[_Iterable[_Union[SliceReplicas, _Mapping]]] = ...) -> None: ...

class SliceReplicas(_message.Message):
    __slots__ = ("addresses",)
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class ExpertPlacement(_message.Message):
    __slots__ = ("version", "locations")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    version: int
    locations: _containers.RepeatedCompositeFieldContainer[ExpertLocation]
    def __init__(self, version: _Optional[int] = ..., locations: _Optional[_Iterable[_Union[ExpertLocation, _Mapping]]] = ...) -> None: ...

class UpdatePlacementResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class GetStageInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("name", "layers", "is_first", "is_last", "cached_sequence_ids", "placement_version", "host_id", "tp_all_reduce", "not_serving_reason", "sequence_history")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    IS_FIRST_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    CACHED_SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    TP_ALL_REDUCE_FIELD_NUMBER: _ClassVar[int]
    NOT_SERVING_REASON_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    layers: _router_pb2.LayerRange
    is_first: bool
    is_last: bool
    cached_sequence_ids: _containers.RepeatedScalarFieldContainer[int]
    placement_version: int
    host_id: str
    tp_all_reduce: str
    not_serving_reason: str
    sequence_history: _containers.RepeatedCompositeFieldContainer[SequenceHistory]
    def __init__(self, name: _Optional[str] = ..., layers: _Optional[_Union[_router_pb2.LayerRange, _Mapping]] = ..., is_first: _Optional[bool] = ..., is_last: _Optional[bool] = ..., cached_sequence_ids: _Optional[_Iterable[int]] = ..., placement_version: _Optional[int] = ..., host_id: _Optional[str] = ..., tp_all_reduce: _Optional[str] = ..., not_serving_reason: _Optional[str] = ..., sequence_history: _Optional[_Iterable[_Union[SequenceHistory, _Mapping]]] = ...) -> None: ...

class SequenceHistory(_message.Message):
    __slots__ = ("sequence_id", "tokens_received", "steps", "first_start_position", "first_num_tokens", "frees")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FIRST_START_POSITION_FIELD_NUMBER: _ClassVar[int]
    FIRST_NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FREES_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    tokens_received: int
    steps: int
    first_start_position: int
    first_num_tokens: int
    frees: int
    def __init__(self, sequence_id: _Optional[int] = ..., tokens_received: _Optional[int] = ..., steps: _Optional[int] = ..., first_start_position: _Optional[int] = ..., first_num_tokens: _Optional[int] = ..., frees: _Optional[int] = ...) -> None: ...
