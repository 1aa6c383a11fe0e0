from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OfferDataPlanesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JoinNcclGroupRequest(_message.Message):
    __slots__ = ("unique_id", "world_size", "rank", "group", "owner")
    UNIQUE_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    unique_id: bytes
    world_size: int
    rank: int
    group: str
    owner: str
    def __init__(self, unique_id: _Optional[bytes] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., group: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class JoinNcclGroupReply(_message.Message):
    __slots__ = ("device", "rank")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    device: str
    rank: int
    def __init__(self, device: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class DataPlaneOffer(_message.Message):
    __slots__ = ("shm_socket", "shm_session_key", "cuda_ipc")
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    SHM_SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    shm_socket: str
    shm_session_key: bytes
    cuda_ipc: bool
    def __init__(self, shm_socket: _Optional[str] = ..., shm_session_key: _Optional[bytes] = ..., cuda_ipc: _Optional[bool] = ...) -> None: ...

class ShmFrame(_message.Message):
    __slots__ = ("hello", "hello_reply", "call", "reply")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HELLO_REPLY_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    hello: ShmHello
    hello_reply: ShmHelloReply
    call: ShmCall
    reply: ShmReply
    def __init__(self, hello: _Optional[_Union[ShmHello, _Mapping]] = ..., hello_reply: _Optional[_Union[ShmHelloReply, _Mapping]] = ..., call: _Optional[_Union[ShmCall, _Mapping]] = ..., reply: _Optional[_Union[ShmReply, _Mapping]] = ...) -> None: ...

class ShmHello(_message.Message):
    __slots__ = ("session_key", "segment", "segment_bytes", "probe", "cuda_ipc_handle", "cuda_segment_bytes")
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CUDA_SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_key: bytes
    segment: str
    segment_bytes: int
    probe: bytes
    cuda_ipc_handle: bytes
    cuda_segment_bytes: int
    def __init__(self, session_key: _Optional[bytes] = ..., segment: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., probe: _Optional[bytes] = ..., cuda_ipc_handle: _Optional[bytes] = ..., cuda_segment_bytes: _Optional[int] = ...) -> None: ...

class ShmHelloReply(_message.Message):
    __slots__ = ("probe", "status_code", "status_details", "cuda_probe")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    CUDA_PROBE_FIELD_NUMBER: _ClassVar[int]
    probe: bytes
    status_code: int
    status_details: str
    cuda_probe: bytes
    def __init__(self, probe: _Optional[bytes] = ..., status_code: _Optional[int] = ..., status_details: _Optional[str] = ..., cuda_probe: _Optional[bytes] = ...) -> None: ...

class ShmCall(_message.Message):
    __slots__ = ("call_id", "method", "request", "reply_offset", "cuda_reply_offset")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REPLY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    CUDA_REPLY_OFFSET_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    method: str
    request: bytes
    reply_offset: int
    cuda_reply_offset: int
    def __init__(self, call_id: _Optional[int] = ..., method: _Optional[str] = ..., request: _Optional[bytes] = ..., reply_offset: _Optional[int] = ..., cuda_reply_offset: _Optional[int] = ...) -> None: ...

class ShmReply(_message.Message):
    __slots__ = ("call_id", "response", "status_code", "status_details")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAILS_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    response: bytes
    status_code: int
    status_details: str
    def __init__(self, call_id: _Optional[int] = ..., response: _Optional[bytes] = ..., status_code: _Optional[int] = ..., status_details: _Optional[str] = ...) -> None: ...
