from shardmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]

class ServerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVER_ROLE_UNSPECIFIED: _ClassVar[ServerRole]
    SERVER_ROLE_STAGE: _ClassVar[ServerRole]
    SERVER_ROLE_EXPERT: _ClassVar[ServerRole]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
SERVER_ROLE_UNSPECIFIED: ServerRole
SERVER_ROLE_STAGE: ServerRole
SERVER_ROLE_EXPERT: ServerRole

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt_token_ids", "prompt_text", "max_new_tokens", "sampling", "stop_token_ids", "ignore_eos", "return_logits")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGITS_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_text: str
    max_new_tokens: int
    sampling: SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    return_logits: bool
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., prompt_text: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., return_logits: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_id", "text", "index", "finish_reason", "logits", "prompt_tokens")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    index: int
    finish_reason: FinishReason
    logits: _tensor_pb2.Tensor
    prompt_tokens: int
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., index: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("family", "num_layers", "hidden_size", "vocab_size", "max_context", "num_experts", "experts_per_token", "has_tokenizer", "eos_token_ids", "model_fingerprint")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_context: int
    num_experts: int
    experts_per_token: int
    has_tokenizer: bool
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    model_fingerprint: str
    def __init__(self, family: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., num_experts: _Optional[int] = ..., experts_per_token: _Optional[int] = ..., has_tokenizer: _Optional[bool] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ("include_expert_load", "load_window_seconds")
    INCLUDE_EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    include_expert_load: bool
    load_window_seconds: float
    def __init__(self, include_expert_load: _Optional[bool] = ..., load_window_seconds: _Optional[float] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ExpertKey(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class ExpertSliceKey(_message.Message):
    __slots__ = ("layer", "expert", "rank", "count")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    rank: int
    count: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., rank: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("name", "role", "address", "registered", "layers", "experts", "replica_addresses", "unreachable_addresses", "tp_shards", "expert_slices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    TP_SHARDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_SLICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: ServerRole
    address: str
    registered: bool
    layers: LayerRange
    experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    replica_addresses: _containers.RepeatedScalarFieldContainer[str]
    unreachable_addresses: _containers.RepeatedScalarFieldContainer[str]
    tp_shards: _containers.RepeatedCompositeFieldContainer[TensorParallelShardStatus]
    expert_slices: _containers.RepeatedCompositeFieldContainer[ExpertSliceKey]
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[ServerRole, str]] = ..., address: _Optional[str] = ..., registered: _Optional[bool] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., replica_addresses: _Optional[_Iterable[str]] = ..., unreachable_addresses: _Optional[_Iterable[str]] = ..., tp_shards: _Optional[_Iterable[_Union[TensorParallelShardStatus, _Mapping]]] = ..., expert_slices: _Optional[_Iterable[_Union[ExpertSliceKey, _Mapping]]] = ...) -> None: ...

class TensorParallelShardStatus(_message.Message):
    __slots__ = ("rank", "shard_id", "seconds_since_heard", "generation")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARD_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    rank: int
    shard_id: str
    seconds_since_heard: float
    generation: int
    def __init__(self, rank: _Optional[int] = ..., shard_id: _Optional[str] = ..., seconds_since_heard: _Optional[float] = ..., generation: _Optional[int] = ...) -> None: ...

class SplitExpertStatus(_message.Message):
    __slots__ = ("layer", "expert", "slices")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    slices: _containers.RepeatedCompositeFieldContainer[SplitSliceStatus]
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[SplitSliceStatus, _Mapping]]] = ...) -> None: ...

class SplitSliceStatus(_message.Message):
    __slots__ = ("rank", "server", "addresses", "unreachable_addresses")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    server: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    unreachable_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rank: _Optional[int] = ..., server: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., unreachable_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("serving", "placement_version", "servers", "active_sequences", "expert_load", "expert_servers", "load_window_seconds", "load_imbalance", "unservable", "split_experts")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    EXPERT_SERVERS_FIELD_NUMBER: _ClassVar[int]
    LOAD_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_IMBALANCE_FIELD_NUMBER: _ClassVar[int]
    UNSERVABLE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    placement_version: int
    servers: _containers.RepeatedCompositeFieldContainer[ServerStatus]
    active_sequences: int
    expert_load: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    expert_servers: _containers.RepeatedCompositeFieldContainer[ExpertServerLoad]
    load_window_seconds: float
    load_imbalance: float
    unservable: _containers.RepeatedScalarFieldContainer[str]
    split_experts: _containers.RepeatedCompositeFieldContainer[SplitExpertStatus]
    def __init__(self, serving: _Optional[bool] = ..., placement_version: _Optional[int] = ..., servers: _Optional[_Iterable[_Union[ServerStatus, _Mapping]]] = ..., active_sequences: _Optional[int] = ..., expert_load: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ..., expert_servers: _Optional[_Iterable[_Union[ExpertServerLoad, _Mapping]]] = ..., load_window_seconds: _Optional[float] = ..., load_imbalance: _Optional[float] = ..., unservable: _Optional[_Iterable[str]] = ..., split_experts: _Optional[_Iterable[_Union[SplitExpertStatus, _Mapping]]] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("layer", "expert", "tokens", "replica_addresses", "replica_tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    tokens: int
    replica_addresses: _containers.RepeatedScalarFieldContainer[str]
    replica_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., tokens: _Optional[int] = ..., replica_addresses: _Optional[_Iterable[str]] = ..., replica_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertServerLoad(_message.Message):
    __slots__ = ("name", "address", "experts", "tokens", "busy_seconds", "window_seconds", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    experts: int
    tokens: int
    busy_seconds: float
    window_seconds: float
    error: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., experts: _Optional[int] = ..., tokens: _Optional[int] = ..., busy_seconds: _Optional[float] = ..., window_seconds: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class RegisterServerRequest(_message.Message):
    __slots__ = ("name", "role", "address", "layers", "experts", "model_fingerprint", "replica_id", "expert_slices", "holds_assignment", "placement_version", "tp_shard")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_SLICES_FIELD_NUMBER: _ClassVar[int]
    HOLDS_ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TP_SHARD_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: ServerRole
    address: str
    layers: LayerRange
    experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    model_fingerprint: str
    replica_id: str
    expert_slices: _containers.RepeatedCompositeFieldContainer[ExpertSliceKey]
    holds_assignment: bool
    placement_version: int
    tp_shard: TensorParallelShard
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[ServerRole, str]] = ..., address: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., model_fingerprint: _Optional[str] = ..., replica_id: _Optional[str] = ..., expert_slices: _Optional[_Iterable[_Union[ExpertSliceKey, _Mapping]]] = ..., holds_assignment: _Optional[bool] = ..., placement_version: _Optional[int] = ..., tp_shard: _Optional[_Union[TensorParallelShard, _Mapping]] = ...) -> None: ...

class TensorParallelShard(_message.Message):
    __slots__ = ("shard_id", "rank", "rendezvous", "starting", "generation", "group_lost")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    STARTING_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    GROUP_LOST_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    rank: int
    rendezvous: str
    starting: bool
    generation: int
    group_lost: bool
    def __init__(self, shard_id: _Optional[str] = ..., rank: _Optional[int] = ..., rendezvous: _Optional[str] = ..., starting: _Optional[bool] = ..., generation: _Optional[int] = ..., group_lost: _Optional[bool] = ...) -> None: ...

class TensorParallelAssignment(_message.Message):
    __slots__ = ("rank", "world_size", "rendezvous", "generation")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    rendezvous: str
    generation: int
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., rendezvous: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class RegisterServerResponse(_message.Message):
    __slots__ = ("placement_version", "reassigned", "assigned_experts", "tp")
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASSIGNED_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    placement_version: int
    reassigned: bool
    assigned_experts: _containers.RepeatedCompositeFieldContainer[ExpertKey]
    tp: TensorParallelAssignment
    def __init__(self, placement_version: _Optional[int] = ..., reassigned: _Optional[bool] = ..., assigned_experts: _Optional[_Iterable[_Union[ExpertKey, _Mapping]]] = ..., tp: _Optional[_Union[TensorParallelAssignment, _Mapping]] = ...) -> None: ...
