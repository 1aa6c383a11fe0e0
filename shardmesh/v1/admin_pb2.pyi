from shardmesh.v1 import router_pb2 as _router_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RemoveServerRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class RemoveServerResponse(_message.Message):
    __slots__ = ("name", "replica_id", "drained", "drain", "placement_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    replica_id: str
    drained: bool
    drain: RebalanceResponse
    placement_version: int
    def __init__(self, name: _Optional[str] = ..., replica_id: _Optional[str] = ..., drained: _Optional[bool] = ..., drain: _Optional[_Union[RebalanceResponse, _Mapping]] = ..., placement_version: _Optional[int] = ...) -> None: ...

class ServerExperts(_message.Message):
    __slots__ = ("address", "name", "experts")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    address: str
    name: str
    experts: _containers.RepeatedCompositeFieldContainer[_router_pb2.ExpertKey]
    def __init__(self, address: _Optional[str] = ..., name: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[_router_pb2.ExpertKey, _Mapping]]] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("load_window_seconds", "slots_per_server", "drain", "target", "dry_run", "min_gain")
    LOAD_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_SERVER_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    MIN_GAIN_FIELD_NUMBER: _ClassVar[int]
    load_window_seconds: float
    slots_per_server: int
    drain: _containers.RepeatedScalarFieldContainer[str]
    target: _containers.RepeatedCompositeFieldContainer[ServerExperts]
    dry_run: bool
    min_gain: float
    def __init__(self, load_window_seconds: _Optional[float] = ..., slots_per_server: _Optional[int] = ..., drain: _Optional[_Iterable[str]] = ..., target: _Optional[_Iterable[_Union[ServerExperts, _Mapping]]] = ..., dry_run: _Optional[bool] = ..., min_gain: _Optional[float] = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("changed", "placement_version", "imbalance_before", "imbalance_after", "placement", "loaded", "dropped", "seconds", "note")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    placement_version: int
    imbalance_before: float
    imbalance_after: float
    placement: _containers.RepeatedCompositeFieldContainer[ServerExperts]
    loaded: _containers.RepeatedCompositeFieldContainer[ServerExperts]
    dropped: _containers.RepeatedCompositeFieldContainer[ServerExperts]
    seconds: float
    note: str
    def __init__(self, changed: _Optional[bool] = ..., placement_version: _Optional[int] = ..., imbalance_before: _Optional[float] = ..., imbalance_after: _Optional[float] = ..., placement: _Optional[_Iterable[_Union[ServerExperts, _Mapping]]] = ..., loaded: _Optional[_Iterable[_Union[ServerExperts, _Mapping]]] = ..., dropped: _Optional[_Iterable[_Union[ServerExperts, _Mapping]]] = ..., seconds: _Optional[float] = ..., note: _Optional[str] = ...) -> None: ...
