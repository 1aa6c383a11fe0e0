"""Tensor <-> shardmesh.v1.Tensor: raw little-endian row-major bytes with dtype and shape.

Decoding validates everything that came from the network (dtype known, shape non-negative, byte
length matching) and raises `InvalidArgument` naming the field, so a servicer can answer with a
precise status. Nothing is pickled.
"""

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


def encode(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode any CPU or CUDA tensor of a served dtype (copied to contiguous CPU memory)."""
    if tensor.dtype not in TORCH_TO_WIRE:
        raise TypeError(f"dtype {tensor.dtype} is not served on the wire")
    flat = tensor.detach().to("cpu").contiguous()
    data = flat.view(_VIEW_AS.get(flat.dtype, flat.dtype)).numpy().tobytes()
    return tensor_pb2.Tensor(dtype=TORCH_TO_WIRE[tensor.dtype], shape=list(tensor.shape), data=data)


def decode(message: tensor_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decode a wire tensor without copying its bytes; raises InvalidArgument naming `field`.

    The result shares memory with the message's bytes and is read-only in spirit: clone it
    before an in-place write.
    """
    dtype = WIRE_TO_TORCH.get(message.dtype)
    if dtype is None:
        raise InvalidArgument(f"{field}.dtype", f"unknown or unspecified dtype {message.dtype}")
    shape = list(message.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"{field}.shape", f"negative dimension in {shape}")
    if math.prod(dim for dim in shape if dim) >= 2**63:  # torch cannot even make an empty tensor of it
        raise InvalidArgument(f"{field}.shape", f"{shape} has more elements than int64 can count")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
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
