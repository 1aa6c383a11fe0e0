"""shardmesh.codec: tensors survive the wire bit for bit, and bad wire tensors are refused by field."""

import struct

import pytest
import torch

from shardmesh import codec
from shardmesh.errors import InvalidArgument
from shardmesh.v1 import tensor_pb2

SERVED = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32]


def sample(shape, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=generator, dtype=torch.int64).to(dtype)


def round_trip(tensor: torch.Tensor) -> torch.Tensor:
    message = tensor_pb2.Tensor.FromString(codec.encode(tensor).SerializeToString())
    return codec.decode(message, "x")


def assert_bit_identical(decoded: torch.Tensor, original: torch.Tensor) -> None:
    assert decoded.dtype == original.dtype and decoded.shape == original.shape
    assert torch.equal(decoded, original)  # bf16/fp16: every value, so every bit pattern but NaNs


@pytest.mark.parametrize("dtype", SERVED, ids=str)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 4)], ids=str)
def test_round_trip(dtype, shape):
    tensor = sample(shape, dtype)
    assert_bit_identical(round_trip(tensor), tensor)


@pytest.mark.parametrize("dtype", SERVED, ids=str)
@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0), (2, 0, 5)], ids=str)
def test_empty_tensors(dtype, shape):
    tensor = torch.empty(shape, dtype=dtype)
    message = codec.encode(tensor)
    assert message.data == b"" and list(message.shape) == list(shape)
    assert_bit_identical(round_trip(tensor), tensor)


@pytest.mark.parametrize("dtype", SERVED, ids=str)
def test_non_contiguous_inputs(dtype):
    base = sample((6, 8), dtype)
    for view in (base.t(), base[::2, 1::3], base.t()[1:, ::2], base[:, 3], base.unsqueeze(0).expand(2, 6, 8)):
        assert not view.is_contiguous()
        assert_bit_identical(round_trip(view), view.contiguous())


def test_wire_bytes_are_little_endian_row_major():
    tensor = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32).t()  # logical rows (1, 3), (2, 4)
    message = codec.encode(tensor)
    assert message.dtype == tensor_pb2.DTYPE_INT32 and list(message.shape) == [2, 2]
    assert message.data == struct.pack("<4i", 1, 3, 2, 4)
    assert codec.encode(torch.tensor(1.0, dtype=torch.bfloat16)).data == struct.pack("<H", 0x3F80)
    assert codec.encode(torch.tensor([-2.0], dtype=torch.float16)).data == struct.pack("<e", -2.0)


def test_special_float_values_survive():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensor = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0], dtype=dtype)
        decoded = round_trip(tensor)
        assert torch.equal(decoded, tensor) and torch.signbit(decoded).tolist() == [False, True, True, False]
        assert round_trip(torch.tensor([float("nan")], dtype=dtype)).isnan().all()


def test_unserved_dtype_is_refused_on_encode():
    with pytest.raises(TypeError, match="float64"):
        codec.encode(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("message, field, words", [
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), "hidden_states.dtype", "0"),
    (tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4), "hidden_states.dtype", "99"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20), "hidden_states.data", "20 bytes"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BFLOAT16, shape=[4], data=b"\0" * 16), "hidden_states.data", "16 bytes"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[], data=b""), "hidden_states.data", "0 bytes"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[2, -1], data=b""), "hidden_states.shape", "negative"),
], ids=["unspecified-dtype", "unknown-dtype", "short-data", "long-data", "scalar-without-data", "negative-dim"])
def test_decode_errors_name_the_field(message, field, words):
    with pytest.raises(InvalidArgument) as info:
        codec.decode(message, "hidden_states")
    assert info.value.field == field and info.value.code == "INVALID_ARGUMENT"
    assert words in info.value.message and str(info.value).startswith(f"{field}: ")


def test_decoded_tensor_is_usable_after_clone():
    tensor = sample((3, 4), torch.float32)
    decoded = round_trip(tensor).clone()
    decoded += 1  # a clone is writable; the decoded view shares the message's bytes
    assert torch.equal(decoded, tensor + 1)


@pytest.mark.parametrize("other", ["cuda_ipc", "nccl"])
def test_a_tensor_in_shared_memory_and_elsewhere_is_refused_naming_the_other_span(other):
    """codec.decode's shared-memory fast path takes a tensor with `shm` and no other span only."""
    from shardmesh.shm_segment import Segment

    segment = Segment.create(1 << 16)
    try:
        message = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 2])
        message.shm.offset, message.shm.length = 128, 16
        assert codec.decode(message, "t", segment=segment, cuda_segment=None, nccl_payload=None).shape == (2, 2)
        getattr(message, other).length = 16
        with pytest.raises(InvalidArgument) as error:
            codec.decode(message, "t", segment=segment, cuda_segment=None, nccl_payload=None)
        assert error.value.field == f"t.{other}" and "not both" in str(error.value)
    finally:
        segment.close()
