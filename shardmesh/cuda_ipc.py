"""CUDA IPC segments: device memory one process allocates and another process of the same node maps,
so that stage <-> expert tensors of two GPU services move device to device, never through host memory.

They ride on the shared-memory data plane (shm_plane.py / shm_server.py): the client allocates a
`CudaSegment` on its device, writes the hello's probe at its offset 0 and sends the segment's IPC
handle in its hello; the server maps it on its own device and echoes the probe it reads there. A
server that cannot (another node, no CUDA, the same process: cudaIpcOpenMemHandle refuses handles
of its own process) answers with no probe, and the session keeps host shared memory only.

Ordering: a writer synchronizes its device before the frame that announces the bytes goes out
(`DeviceArena.publish`); the reader, which received that frame, then reads in its own stream.

    segment = CudaSegment.create(8 << 20, "cuda:0")       # client
    hello.cuda_ipc_handle = segment.handle
    segment = CudaSegment.attach(handle, size, "cuda:0")  # server; InvalidArgument on a bad handle

`CudaSegment` has the interface of shm_segment.Segment that ReplyArena and codec use (size, usable,
view, write, probe, close), so tensors are placed and viewed the same way. The memory comes from a
backend (`CupyIpc`, CuPy imported lazily: a CPU-only install never imports it); tests inject a fake.
"""

import os
import typing

import torch

from shardmesh.errors import InvalidArgument
from shardmesh.shm_segment import ALIGN, PROBE_BYTES, ReplyArena, align

HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


class IpcBackend(typing.Protocol):
    def allocate(self, size: int, device: torch.device) -> tuple[torch.Tensor, bytes, typing.Callable[[], None]]:
        """A new device buffer: (uint8 [size] tensor on `device`, its IPC handle, free)."""
        ...

    def open(self, handle: bytes, size: int, device: torch.device) -> tuple[torch.Tensor, typing.Callable[[], None]]:
        """Map another process's buffer: (uint8 [size] tensor on `device`, close); raises on failure."""
        ...


class CupyIpc:
    """cudaMalloc / cudaIpcGetMemHandle / cudaIpcOpenMemHandle through CuPy's runtime bindings. The
    buffer is a raw cudaMalloc (not a pool's sub-allocation), so the handle names its first byte."""

    def __init__(self):
        import cupy  # lazily: only GPU services need it (the `gpu` extra)

        self.cupy = cupy

    def _tensor(self, pointer: int, size: int, device: torch.device, owner) -> torch.Tensor:
        cupy = self.cupy
        memory = cupy.cuda.UnownedMemory(pointer, size, owner, device_id=device.index)
        array = cupy.ndarray((size,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
        return torch.as_tensor(array, device=device)  # __cuda_array_interface__: no copy

    def allocate(self, size, device):
        runtime = self.cupy.cuda.runtime
        with self.cupy.cuda.Device(device.index):
            pointer = runtime.malloc(size)
            handle = bytes(runtime.ipcGetMemHandle(pointer))
        return self._tensor(pointer, size, device, self), handle, lambda: runtime.free(pointer)

    def open(self, handle, size, device):
        runtime = self.cupy.cuda.runtime
        with self.cupy.cuda.Device(device.index):
            pointer = runtime.ipcOpenMemHandle(handle)
        return self._tensor(pointer, size, device, self), lambda: runtime.ipcCloseMemHandle(pointer)


_default: CupyIpc | None = None


def default_backend() -> IpcBackend:
    """CuPy's runtime; ImportError without CuPy, or when SHARDMESH_CUDA_IPC=off (benchmarks compare
    the host shared-memory plane with it; sessions are then host-only)."""
    global _default
    if os.environ.get("SHARDMESH_CUDA_IPC", "on") == "off":
        raise ImportError("CUDA IPC is off (SHARDMESH_CUDA_IPC=off)")
    if _default is None:
        _default = CupyIpc()
    return _default


class CudaSegment:
    """A device buffer shared by two processes of one node (see the module docstring)."""

    def __init__(self, memory: torch.Tensor, handle: bytes, release: typing.Callable[[], None]):
        self.size = memory.numel()
        self.usable = self.size // ALIGN * ALIGN
        self.device = memory.device
        self.handle = handle
        self._bytes = memory  # uint8 [size] on the device: every view is a slice of it
        self._release = release

    @classmethod
    def create(cls, size: int, device: str | torch.device, backend: IpcBackend | None = None) -> "CudaSegment":
        backend = backend or default_backend()
        memory, handle, release = backend.allocate(align(size), torch.device(device))
        return cls(memory, handle, release)

    @classmethod
    def attach(cls, handle: bytes, size: int, device: str | torch.device, backend: IpcBackend | None = None,
               max_bytes: int = 1 << 30) -> "CudaSegment":
        """Map a peer's segment; InvalidArgument naming the hello field that is wrong, or the reason
        the handle does not open here (the caller then offers host shared memory only)."""
        if len(handle) != HANDLE_BYTES:
            raise InvalidArgument("hello.cuda_ipc_handle", f"{len(handle)} bytes, not {HANDLE_BYTES}")
        if not PROBE_BYTES <= size <= max_bytes or size % ALIGN:
            raise InvalidArgument("hello.cuda_segment_bytes", f"{size} is not a multiple of {ALIGN} in "
                                                              f"[{PROBE_BYTES}, {max_bytes}]")
        backend = backend or default_backend()
        try:
            memory, release = backend.open(handle, size, torch.device(device))
        except Exception as error:  # CuPy's CUDARuntimeError: another node, our own process, ...
            raise InvalidArgument("hello.cuda_ipc_handle", f"does not open on {device}: {error}") from error
        return cls(memory, handle, release)

    def view(self, offset: int, length: int, dtype: torch.dtype, shape: list[int], field: str) -> torch.Tensor:
        """The tensor at [offset, offset + length), without copying; InvalidArgument naming `field`."""
        if offset % ALIGN or offset + length > self.usable:
            raise InvalidArgument(f"{field}.cuda_ipc", f"span [{offset}, {offset + length}) is misaligned or "
                                                       f"outside the {self.usable}-byte CUDA segment")
        return self._bytes[offset:offset + length].view(dtype).view(shape)

    def write(self, offset: int, tensor: torch.Tensor) -> None:
        """Copy `tensor` (its device's stream) to [offset, offset + nbytes); the caller checked the room."""
        if tensor.numel():
            target = self._bytes[offset:offset + tensor.numel() * tensor.element_size()]
            target.view(tensor.dtype).view(tensor.shape).copy_(tensor)

    def write_probe(self, probe: bytes) -> None:
        self._bytes[:len(probe)].copy_(torch.frombuffer(bytearray(probe), dtype=torch.uint8))
        synchronize(self.device)

    def probe(self) -> bytes:
        return bytes(self._bytes[:PROBE_BYTES].cpu().numpy().tobytes())

    def close(self) -> None:
        """Wait for the device, then free (the owner) or unmap (the peer); idempotent."""
        if self._release is not None:
            synchronize(self.device)
            release, self._release, self._bytes = self._release, None, None
            release()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeviceArena:
    """One call's room for tensors: those on the CUDA segment's device go there (Tensor.cuda_ipc),
    everything else (and what does not fit) to the host arena (Tensor.shm, or inline).

    `put` returns (offset, length, span field) or None (inline). `spilled` counts device bytes that
    did not fit (the session asks for a larger segment next time)."""

    def __init__(self, host: ReplyArena | None, device: ReplyArena):
        self.host, self.device = host, device
        self.spilled = 0
        self.used_device = False

    @property
    def next(self) -> int:  # the host arena's next offset (the call header's reply_offset, shm_frames.py)
        return self.host.next if self.host is not None else 0

    def put(self, tensor: torch.Tensor):
        if tensor.device == self.device.segment.device:
            placed = self.device.put(tensor)
            if placed is not None:
                self.used_device = True
                return (*placed, "cuda_ipc")
            self.spilled += tensor.numel() * tensor.element_size()
        return self.host.put(tensor) if self.host is not None else None

    def publish(self) -> None:
        """Before the frame announcing this call's tensors goes out: the device has written them."""
        if self.used_device:
            synchronize(self.device.segment.device)
