"""Tensor <-> shardmesh.v1.Tensor: raw little-endian row-major bytes with dtype and shape.

Decoding validates everything that came from the network (dtype known, shape non-negative, byte
length matching) and raises `InvalidArgument` naming the field, so a servicer can answer with a
precise status. Nothing is pickled.

On the shared-memory data plane (shardmesh.shm_plane) a tensor's bytes may instead lie in a
segment both processes map (`Tensor.shm`): `decode` views them in place and `encode` writes them
there. By default both use the segment of the shared-memory call being served in the current
context (`inbound_call`, set by the plane around a servicer method), so servicers need not know
which plane a call came by; clients of a plane pass their own segment/arena (or None) explicitly.
"""

import contextvars
import math
import sys
import warnings

import torch

from shardmesh.errors import InvalidArgument
from shardmesh.v1 import tensor_pb2

assert sys.byteorder == "little", "the wire format is little-endian"

TORCH_TO_WIRE = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
}
WIRE_TO_TORCH = {wire: dtype for dtype, wire in TORCH_TO_WIRE.items()}

# bf16 has no numpy dtype: move it as int16 bits.
_VIEW_AS = {torch.bfloat16: torch.int16}

MAX_DECODED = 64  # tensors a segment keeps by their wire bytes (decode)
INBOUND = object()  # default of `arena` / `segment`: the shared-memory call served in this context, if any
# (shm_segment.Segment, shm_segment.ReplyArena[, cuda_ipc.CudaSegment]) of the shared-memory call this
# context serves, or (None, nccl_dispatch.PayloadArena, None, nccl_dispatch.Payload) of a call over an
# NCCL link (nccl_dispatch.serves_nccl_calls); else None.
inbound_call: contextvars.ContextVar = contextvars.ContextVar("shardmesh_inbound_shm_call", default=None)


def encode(tensor: torch.Tensor, arena=INBOUND) -> tensor_pb2.Tensor:
    """Encode any CPU or CUDA tensor of a served dtype (copied to contiguous CPU memory).

    With a reply arena (shm_segment.ReplyArena; by default the reply arena of the shared-memory
    call served in this context) the bytes are written there when they fit (`Tensor.shm`), else
    they go in `data`; arena=None always uses `data`."""
    if tensor.dtype not in TORCH_TO_WIRE:
        raise TypeError(f"dtype {tensor.dtype} is not served on the wire")
    if arena is INBOUND:
        call = inbound_call.get()
        arena = call[1] if call is not None else None
    if arena is not None:
        placed = arena.put(tensor.detach() if tensor.requires_grad else tensor)
        if placed is not None:
            message = tensor_pb2.Tensor()
            _name_span(message, tensor, placed)
            return message
    flat = tensor.detach().to("cpu").contiguous()
    data = flat.view(_VIEW_AS.get(flat.dtype, flat.dtype)).numpy().tobytes()
    return tensor_pb2.Tensor(dtype=TORCH_TO_WIRE[tensor.dtype], shape=list(tensor.shape), data=data)


def claim_reply(shape, dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """An uninitialized CPU tensor for a servicer to compute a reply into, and where it lies: on the
    shared-memory plane a view of the served call's reply arena and its span (offset, length), which
    `encode_into` then names without a copy (the caller writes every element first); elsewhere, or
    when it does not fit, a new tensor and None."""
    call = inbound_call.get()
    claim = getattr(call[1], "claim", None) if call is not None else None  # (a device arena has none)
    claimed = claim(shape, dtype) if claim is not None else None
    return claimed if claimed is not None else (torch.empty(shape, dtype=dtype), None)


def encode_into(message: tensor_pb2.Tensor, tensor: torch.Tensor, placed: tuple[int, int] | None = None) -> None:
    """encode(tensor) written into `message`, a wire Tensor field of the message being built (no
    submessage made and copied). placed: the tensor's span in the call's shared-memory segment
    (claim_reply's, or ReplyArena.claim's), named as it lies; None: as encode places it."""
    if placed is None:
        message.CopyFrom(encode(tensor))
    else:
        _name_span(message, tensor, placed)


def _name_span(message: tensor_pb2.Tensor, tensor: torch.Tensor, placed: tuple) -> None:
    """message: tensor's dtype and shape, its bytes at (offset, length) of host shared memory, or at
    (offset, length, span field) (cuda_ipc.DeviceArena: field "cuda_ipc"; an NCCL payload: "nccl")."""
    message.dtype = TORCH_TO_WIRE[tensor.dtype]
    message.shape.extend(tensor.shape)
    span = message.shm if len(placed) == 2 else getattr(message, placed[2])
    span.offset, span.length = placed[0], placed[1]


def decode(message: tensor_pb2.Tensor, field: str = "tensor", segment=INBOUND, cuda_segment=INBOUND,
           nccl_payload=INBOUND) -> torch.Tensor:
    """Decode a wire tensor without copying its bytes (see _decode); raises InvalidArgument naming `field`.

    A tensor in a shared-memory segment (`shm`) decoded once is looked up after that by the
    message's own bytes (the segment's `decoded`): a session's calls name the same spans call after
    call, and one serialization and one lookup cost less than the checks (each op counts on the
    cold caches between kernels). Only what decoded without error is kept."""
    if message.HasField("shm"):
        where = segment
        if where is INBOUND:
            call = inbound_call.get()
            where = call[0] if call is not None else None
        decoded = getattr(where, "decoded", None)  # shm_segment.Segment's: wire bytes -> tensor
        if decoded is not None:
            key = message.SerializeToString()
            tensor = decoded.get(key)
            if tensor is None:
                tensor = _decode(message, field, where, cuda_segment, nccl_payload)
                if len(decoded) >= MAX_DECODED:
                    decoded.clear()
                decoded[key] = tensor
            return tensor
    return _decode(message, field, segment, cuda_segment, nccl_payload)


def _decode(message: tensor_pb2.Tensor, field: str = "tensor", segment=INBOUND, cuda_segment=INBOUND,
            nccl_payload=INBOUND) -> torch.Tensor:
    """Decode a wire tensor without copying its bytes; raises InvalidArgument naming `field`.

    The result shares memory with the message's bytes and is read-only in spirit: clone it
    before an in-place write. A tensor in shared memory (`shm`) is a view of `segment`
    (shm_segment.Segment; by default that of the shared-memory call served in this context),
    valid while that call lasts; with no such segment it is refused. Likewise a tensor in a CUDA
    IPC segment (`cuda_ipc`; `cuda_segment`: cuda_ipc.CudaSegment, by default the third element of
    the inbound call): a view of device memory. And a tensor in the payload of a call over an NCCL
    link (`nccl`; `nccl_payload`: nccl_dispatch.Payload, by default the fourth element): a view of it.
    """
    dtype = WIRE_TO_TORCH.get(message.dtype)
    if dtype is None:
        raise InvalidArgument(f"{field}.dtype", f"unknown or unspecified dtype {message.dtype}")
    shape = list(message.shape)
    if shape and min(shape) <= 0:
        if min(shape) < 0:
            raise InvalidArgument(f"{field}.shape", f"negative dimension in {shape}")
        if math.prod(dim for dim in shape if dim) >= 2**63:  # torch cannot even make an empty tensor of it
            raise InvalidArgument(f"{field}.shape", f"{shape} has more elements than int64 can count")
    numel = math.prod(shape)
    if numel >= 2**63:
        raise InvalidArgument(f"{field}.shape", f"{shape} has more elements than int64 can count")
    itemsize = dtype.itemsize
    has = message.HasField
    if has("shm") and not (has("cuda_ipc") or has("nccl")):  # (the shared-memory plane's tensors: most)
        return _decode_shared(message, field, segment, dtype, shape, numel * itemsize)
    spans = [kind for kind in _SPANS if has(kind)]
    if len(spans) > 1:
        raise InvalidArgument(f"{field}.{spans[1]}", f"give one of {' or '.join(spans)}, not both")
    if spans:
        where = {"shm": segment, "cuda_ipc": cuda_segment, "nccl": nccl_payload}[spans[0]]
        return _decode_shared(message, field, where, dtype, shape, numel * itemsize, spans[0])
    if len(message.data) != numel * itemsize:
        raise InvalidArgument(
            f"{field}.data",
            f"{len(message.data)} bytes do not match shape {shape} of {dtype} ({numel * itemsize} bytes)",
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    wire_dtype = _VIEW_AS.get(dtype, dtype)
    with warnings.catch_warnings():
        # frombuffer warns that bytes are immutable; callers clone before writing (see above).
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(message.data, dtype=wire_dtype)
    return flat.view(dtype).reshape(shape)


# Where a tensor's bytes may lie instead of `data`: the field, its element of `inbound_call`, and
# the calls that accept it.
_SPANS = {"shm": (0, "the shared-memory data plane"),
          "cuda_ipc": (2, "the shared-memory data plane with a CUDA IPC segment"),
          "nccl": (3, "a call over an NCCL link (the nccl data plane)")}


def _decode_shared(message: tensor_pb2.Tensor, field: str, segment, dtype: torch.dtype, shape: list[int],
                   nbytes: int, kind: str = "shm") -> torch.Tensor:
    index, where = _SPANS[kind]
    if segment is INBOUND:
        call = inbound_call.get()
        segment = call[index] if call is not None and len(call) > index else None
    if segment is None:
        raise InvalidArgument(f"{field}.{kind}", f"{kind} tensors are only accepted on {where}")
    if message.data:
        raise InvalidArgument(f"{field}.data", f"give data or {kind}, not both")
    span = getattr(message, kind)
    if span.length != nbytes:
        raise InvalidArgument(f"{field}.{kind}.length", f"{span.length} bytes do not match shape {shape} "
                                                        f"of {dtype} ({nbytes} bytes)")
    return segment.view(span.offset, span.length, dtype, shape, field)
