"""Segment.view / Segment.write (shardmesh/shm_segment.py) take numpy's cheaper slicing for the dtypes
numpy has and torch's for the others (bfloat16) and for tensors numpy cannot view (non-contiguous,
off the CPU): both paths give the same bytes, and a view stays a view of the segment (no copy)."""

import pytest
import torch

from shardmesh import codec
from shardmesh.errors import InvalidArgument
from shardmesh.shm_segment import NUMPY_DTYPES, ReplyArena, Segment
from shardmesh.v1 import tensor_pb2

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


@pytest.fixture
def segment():
    segment = Segment.create(1 << 16)
    yield segment
    segment.close()


def sample(dtype: torch.dtype, shape) -> torch.Tensor:
    return (torch.arange(1, 1 + torch.Size(shape).numel()) * 3 - 7).reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [[3, 5], [7], [], [2, 3, 4]])
def test_write_then_view_round_trips_every_dtype_and_shape(segment, dtype, shape):
    tensor = sample(dtype, shape)
    segment.write(128, tensor)
    view = segment.view(128, tensor.numel() * tensor.element_size(), dtype, shape, "t")
    assert view.dtype == dtype and list(view.shape) == shape
    assert torch.equal(view, tensor)
    # The bytes are those torch's own path writes (what the peer's torch-only build would read).
    assert bytes(segment.buffer[128:128 + tensor.numel() * tensor.element_size()]) == \
        tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_view_is_the_segment_itself_not_a_copy(segment):
    view = segment.view(64, 4 * 4, torch.float32, [2, 2], "t")
    segment.write(64, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert view.tolist() == [[1.0, 2.0], [3.0, 4.0]]  # written after the view was taken
    view[1, 1] = 9.0
    assert segment.view(64, 16, torch.float32, [2, 2], "t")[1, 1] == 9.0


def test_non_contiguous_and_bfloat16_tensors_take_torch_s_path_with_the_same_result(segment):
    assert torch.bfloat16 not in NUMPY_DTYPES and torch.float32 in NUMPY_DTYPES
    transposed = sample(torch.float32, [4, 6]).t()  # [6, 4], not contiguous
    assert not transposed.is_contiguous()
    segment.write(256, transposed)
    assert torch.equal(segment.view(256, 96, torch.float32, [6, 4], "t"), transposed)
    halves = sample(torch.bfloat16, [3, 3])
    segment.write(512, halves)
    assert torch.equal(segment.view(512, 18, torch.bfloat16, [3, 3], "t"), halves)


def test_codec_through_an_arena_round_trips_and_bad_spans_are_still_refused(segment):
    arena = ReplyArena(segment, 0)
    tensors = [sample(torch.float32, [2, 8]), sample(torch.int64, [5]), sample(torch.bfloat16, [4])]
    messages = [codec.encode(t, arena=arena) for t in tensors]
    assert all(m.HasField("shm") and not m.data for m in messages)
    for message, tensor in zip(messages, tensors):
        assert torch.equal(codec.decode(message, "t", segment=segment), tensor)
    with pytest.raises(InvalidArgument, match=r"t\.shm"):
        segment.view(segment.usable - 64, 128, torch.float32, [32], "t")  # past the end
    with pytest.raises(InvalidArgument, match=r"t\.shm"):
        segment.view(65, 4, torch.float32, [1], "t")  # misaligned


def test_a_span_viewed_again_is_the_same_view_and_other_spans_and_shapes_are_not(segment):
    from shardmesh.shm_segment import MAX_CACHED_VIEWS

    first = segment.view(128, 24, torch.float32, [2, 3], "t")
    assert segment.view(128, 24, torch.float32, [2, 3], "t") is first  # made once: every call, every layer
    assert list(segment.view(128, 24, torch.float32, [3, 2], "t").shape) == [3, 2]
    assert segment.view(128, 24, torch.int32, [6], "t").dtype == torch.int32
    assert segment.view(192, 24, torch.float32, [2, 3], "t").data_ptr() == first.data_ptr() + 64
    segment.write(128, torch.ones(2, 3))
    assert torch.equal(segment.view(128, 24, torch.float32, [2, 3], "t"), torch.ones(2, 3))  # still the segment
    for offset in range(0, 64 * (MAX_CACHED_VIEWS + 4), 64):  # the cache stays bounded
        segment.view(offset, 4, torch.float32, [1], "t")
    assert len(segment._views) <= MAX_CACHED_VIEWS
    with pytest.raises(InvalidArgument, match=r"t\.shm"):
        segment.view(129, 24, torch.float32, [2, 3], "t")  # misaligned, even beside a cached span


def test_codec_decodes_a_message_seen_before_by_its_bytes_and_never_keeps_a_refused_one(segment):
    arena = ReplyArena(segment, 0)
    a, b = sample(torch.float32, [2, 8]), sample(torch.int64, [5])
    message_a, message_b = codec.encode(a, arena=arena), codec.encode(b, arena=arena)
    first = codec.decode(message_a, "t", segment=segment)
    again = tensor_pb2.Tensor.FromString(message_a.SerializeToString())  # the same bytes, another message
    assert codec.decode(again, "t", segment=segment) is first  # looked up, not made again
    assert torch.equal(codec.decode(message_b, "t", segment=segment), b)  # other bytes: its own tensor
    reshaped = tensor_pb2.Tensor.FromString(message_a.SerializeToString())
    reshaped.shape[:] = [4, 4]
    assert list(codec.decode(reshaped, "t", segment=segment).shape) == [4, 4]
    bad = tensor_pb2.Tensor.FromString(message_a.SerializeToString())
    bad.shape[:] = [3, 8]  # 96 bytes named, 64 in the span
    for _ in range(2):  # refused each time: what failed is not kept
        with pytest.raises(InvalidArgument, match=r"t\.shm\.length"):
            codec.decode(bad, "t", segment=segment)
    both = tensor_pb2.Tensor.FromString(message_a.SerializeToString())
    both.data = b"\0" * 64
    with pytest.raises(InvalidArgument, match=r"t\.data"):
        codec.decode(both, "t", segment=segment)
    for offset in range(0, 64 * (codec.MAX_DECODED + 4), 64):  # the segment keeps a bounded number
        message = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1])
        message.shm.offset, message.shm.length = offset, 4
        codec.decode(message, "t", segment=segment)
    assert len(segment.decoded) <= codec.MAX_DECODED
