"""Shared-memory segments of the shared-memory data plane: files under /dev/shm mapped by two
processes of one host, and `ReplyArena`, the bump allocator a call's replies are written with.

The client creates a segment (`Segment.create`), the server maps it by name (`Segment.attach`,
which accepts only names this module makes), and the client unlinks the file as soon as the
server has mapped it: from then on the memory lives exactly as long as the two mappings, and
nothing is left under /dev/shm whatever way either process ends.

Tensors are viewed in place (`Segment.view`: torch.frombuffer on the mapping, no copy) and
written with one copy (`Segment.write`). Offsets are multiples of ALIGN.
"""

import math
import mmap
import os
import pathlib
import re
import secrets

import numpy
import torch

from shardmesh.errors import InvalidArgument

SHM_DIR = pathlib.Path("/dev/shm")
NAME_PATTERN = re.compile(r"shardmesh-[0-9a-f]{32}")
ALIGN = 64
PROBE_BYTES = 16
MAX_SEGMENT_BYTES = 1 << 30
MAX_CACHED_VIEWS = 64  # per segment (Segment.view)
# Dtypes viewed and written through numpy (bfloat16 has no numpy dtype: torch's own slicing).
NUMPY_DTYPES = {torch.float32: numpy.float32, torch.float16: numpy.float16, torch.int64: numpy.int64,
                torch.int32: numpy.int32, torch.uint8: numpy.uint8}


def align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


class Segment:
    def __init__(self, name: str, size: int, buffer: mmap.mmap, owner: bool):
        self.name, self.size, self.buffer, self.owner = name, size, buffer, owner
        self._linked = owner  # the client's file exists until unlink()
        self.usable = size // ALIGN * ALIGN  # tensors lie in [0, usable)
        self._bytes = torch.frombuffer(buffer, dtype=torch.uint8)  # [size]: every view is a slice of it
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # dtype -> the whole segment as that dtype
        # The same bytes for numpy: a numpy slice + view costs ~1 us where torch's costs ~3-5 us, paid
        # for every tensor of every hop of a decode step (view + write: tests/test_shm_segment_paths.py).
        self._numpy = numpy.frombuffer(buffer, dtype=numpy.uint8)[:self.usable]  # [usable]
        # (offset, length, dtype, shape) -> its view: a session's calls put the same tensors at the
        # same offsets call after call (a layer's groups, their reply), so most views are made once.
        self._views: dict[tuple, torch.Tensor] = {}
        # A wire Tensor's bytes -> what codec.decode made of it in this segment (codec keeps it)
        self.decoded: dict[bytes, torch.Tensor] = {}

    @classmethod
    def available(cls) -> bool:
        """Whether this machine has a writable /dev/shm (Linux)."""
        return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)

    @classmethod
    def create(cls, size: int) -> "Segment":
        """A new zeroed segment of `size` bytes (rounded up to ALIGN), readable and writable by this user only."""
        size = align(size)
        if not PROBE_BYTES <= size <= MAX_SEGMENT_BYTES:
            raise ValueError(f"segment size {size} outside [{PROBE_BYTES}, {MAX_SEGMENT_BYTES}]")
        name = f"shardmesh-{secrets.token_hex(16)}"
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(SHM_DIR / name)
            raise
        finally:
            os.close(fd)
        return cls(name, size, buffer, owner=True)

    @classmethod
    def attach(cls, name: str, size: int) -> "Segment":
        """Map the client's segment `name` of `size` bytes; InvalidArgument naming the field otherwise."""
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidArgument("hello.segment", f"{name!r} is not a shardmesh segment name")
        if not PROBE_BYTES <= size <= MAX_SEGMENT_BYTES:
            raise InvalidArgument("hello.segment_bytes", f"{size} outside [{PROBE_BYTES}, {MAX_SEGMENT_BYTES}]")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as error:
            raise InvalidArgument("hello.segment", f"cannot open {name}: {error.strerror}") from None
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise InvalidArgument("hello.segment_bytes", f"{size} but {name} has {actual} bytes")
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, buffer, owner=False)

    def unlink(self) -> None:
        """Remove the file (the client, once the server has mapped it); idempotent."""
        if self._linked:
            self._linked = False
            try:
                os.unlink(SHM_DIR / self.name)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unlink (if ours) and unmap; a view still alive keeps the mapping until it dies."""
        self.unlink()
        self._bytes, self._typed, self._numpy, self._views, self.decoded = None, {}, None, {}, {}
        try:
            self.buffer.close()
        except BufferError:
            pass  # tensors still view it: the mapping goes with the last of them

    def view(self, offset: int, length: int, dtype: torch.dtype, shape: list[int], field: str) -> torch.Tensor:
        """The tensor at [offset, offset + length) of the segment, without copying; InvalidArgument
        naming `field` when the span is misaligned or outside the segment."""
        key = (offset, length, dtype, tuple(shape))
        tensor = self._views.get(key)  # (made before: its span was checked then)
        if tensor is not None:
            return tensor
        if offset % ALIGN or offset + length > self.usable:
            raise InvalidArgument(f"{field}.shm", f"span [{offset}, {offset + length}) is misaligned or outside "
                                                  f"the {self.usable}-byte segment")
        if length == 0:
            return torch.empty(shape, dtype=dtype)
        numpy_dtype = NUMPY_DTYPES.get(dtype)
        if numpy_dtype is not None:
            tensor = torch.from_numpy(self._numpy[offset:offset + length].view(numpy_dtype).reshape(shape))
        else:
            tensor = self._as(dtype)[offset // dtype.itemsize:(offset + length) // dtype.itemsize].view(shape)
        if len(self._views) >= MAX_CACHED_VIEWS:
            self._views.clear()
        self._views[key] = tensor
        return tensor

    def write(self, offset: int, tensor: torch.Tensor) -> None:
        """Copy `tensor` (any device) to [offset, offset + nbytes); the caller checked the room."""
        count = tensor.numel()
        if not count:
            return
        if tensor.device.type == "cpu" and tensor.dtype in NUMPY_DTYPES and tensor.is_contiguous():
            source = tensor.numpy().reshape(-1).view(numpy.uint8)  # [nbytes], no copy
            self._numpy[offset:offset + source.shape[0]] = source
            return
        start = offset // tensor.dtype.itemsize
        self._as(tensor.dtype)[start:start + count].view(tensor.shape).copy_(tensor)

    def _as(self, dtype: torch.dtype) -> torch.Tensor:
        typed = self._typed.get(dtype)
        if typed is None:  # the size is a multiple of ALIGN, so of every itemsize
            typed = self._typed[dtype] = self._bytes[:self.usable].view(dtype)
        return typed

    def probe(self) -> bytes:
        return bytes(self.buffer[:PROBE_BYTES])


class ReplyArena:
    """Room [start, end) of a segment, handed out in order (one call's tensors)."""

    def __init__(self, segment: Segment, start: int, end: int | None = None):
        self.segment = segment
        self.next = align(max(start, PROBE_BYTES))
        self.end = segment.usable if end is None else end

    def claim(self, shape: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """Room for a tensor computed in place (a reply, or a request's rows): a writable view of the
        segment and its span (offset, length), which the wire Tensor names instead of copying it
        (codec.encode_into); None when it does not fit."""
        length = math.prod(shape) * dtype.itemsize
        if not length or self.next + length > self.end:
            return None
        offset = self.next
        self.next = align(offset + length)
        return self.segment.view(offset, length, dtype, shape, "reply"), (offset, length)

    def put(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """Write `tensor` into the arena: (offset, length), or None when it does not fit."""
        length = tensor.numel() * tensor.element_size()
        if self.next + length > self.end:
            return None
        offset = self.next
        self.segment.write(offset, tensor)
        self.next = align(offset + length)
        return offset, length
