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
    __slots__ = ("shm_socket", "shm_session_key", "cuda_ipc", "shm_frame_version")
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    SHM_SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    SHM_FRAME_VERSION_FIELD_NUMBER: _ClassVar[int]
    shm_socket: str
    shm_session_key: bytes
    cuda_ipc: bool
    shm_frame_version: int
    def __init__(self, shm_socket: _Optional[str] = ..., shm_session_key: _Optional[bytes] = ..., cuda_ipc: _Optional[bool] = ..., shm_frame_version: _Optional[int] = ...) -> None: ...

class ShmFrame(_message.Message):
    __slots__ = ("hello", "hello_reply")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HELLO_REPLY_FIELD_NUMBER: _ClassVar[int]
    hello: ShmHello
    hello_reply: ShmHelloReply
    def __init__(self, hello: _Optional[_Union[ShmHello, _Mapping]] = ..., hello_reply: _Optional[_Union[ShmHelloReply, _Mapping]] = ...) -> None: ...

class ShmHello(_message.Message):
    __slots__ = ("session_key", "segment", "segment_bytes", "probe", "cuda_ipc_handle", "cuda_segment_bytes", "frame_version")
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CUDA_SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAME_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_key: bytes
    segment: str
    segment_bytes: int
    probe: bytes
    cuda_ipc_handle: bytes
    cuda_segment_bytes: int
    frame_version: int
    def __init__(self, session_key: _Optional[bytes] = ..., segment: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., probe: _Optional[bytes] = ..., cuda_ipc_handle: _Optional[bytes] = ..., cuda_segment_bytes: _Optional[int] = ..., frame_version: _Optional[int] = ...) -> None: ...

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
