"""ShmGroup: AllReduce through shared memory for the ranks of a TP group that share one host.

gloo's small-message latency (a TCP round trip per step of its algorithm) can cost more than the
layer it follows; ranks on one host can instead meet in one shared segment (as DeepSpeed's CPU
inference does): each rank copies its part into its slot, publishes a step counter, waits until
every rank has published, and sums the T slots in rank order (so every rank gets the same bits).

Segment layout: flags int64 [T] (the last step each rank published, one 64-byte line each), then
two banks (step parity) of T slots of `capacity` bytes. Writing step k into bank k % 2 first waits
until every rank has published k - 1, i.e. has finished reading step k - 2 from that bank. A
tensor larger than a slot goes through the fallback group (gloo). Waiting polls briefly, then
sleeps with backoff, and raises TPJoinError after `timeout_s`: never a hang.

The flag is stored after the slot's data by plain stores: correct on x86-64's total store order;
other machines use the fallback (`ShmGroup.supported`).
"""

import mmap
import os
import pathlib
import platform
import secrets
import time

import torch

from shardmesh.tp_group import TPGroup, TPJoinError

LINE = 64
SPINS = 2000         # polls before sleeping
MAX_PAUSE_S = 2e-4   # longest sleep between polls
SHM_DIR = pathlib.Path("/dev/shm")


class ShmGroup:
    """A TPGroup over a shared segment; `fallback` (same ranks) carries tensors larger than a slot."""

    def __init__(self, rank: int, world_size: int, path: pathlib.Path, capacity: int, fallback: TPGroup | None,
                 timeout_s: float = 30.0, create: bool = False):
        self.rank, self.world_size, self.capacity = rank, world_size, capacity
        self.fallback, self.timeout_s, self.path = fallback, timeout_s, path
        size = world_size * LINE + 2 * world_size * capacity
        if create:
            with open(path, "wb") as file:
                file.truncate(size)
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), size)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)  # [size]
        self._flags = raw[:world_size * LINE].view(torch.int64)[::LINE // 8]      # [T], one cache line each
        self._banks = raw[world_size * LINE:].view(2, world_size, capacity)        # [2, T, capacity] bytes
        self._step = 0

    @staticmethod
    def supported() -> bool:
        return platform.machine() in ("x86_64", "AMD64") and SHM_DIR.is_dir()

    @classmethod
    def over(cls, group, capacity: int = 1 << 20, timeout_s: float = 30.0) -> "ShmGroup":
        """A ShmGroup for the ranks of `group` (a GlooGroup: its store carries the segment's name);
        rank 0 creates the segment, unlinked once every rank has mapped it."""
        store, key = group.store, f"{group.name}/shm"
        if group.rank == 0:
            path = SHM_DIR / f"shardmesh-tp-{secrets.token_hex(8)}"
            shm = cls(0, group.world_size, path, capacity, group, timeout_s, create=True)
            store.set(key, str(path))
        else:
            shm = cls(group.rank, group.world_size, pathlib.Path(store.get(key).decode()), capacity, group, timeout_s)
        group.all_reduce(torch.zeros(1))  # every rank has mapped it
        if group.rank == 0:
            os.unlink(shm.path)
        return shm

    def _wait_all(self, step: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        spins, pause = 0, 0.0
        while int(self._flags.min()) < step:
            spins += 1
            if spins < SPINS:
                continue
            # Then sleep, backing off: a spinning rank must not take the core a late peer needs
            # (more shards than cores; ranks that are threads of one process share the GIL).
            pause = min(MAX_PAUSE_S, pause * 2 or 1e-5)
            time.sleep(pause)
            if time.monotonic() > deadline:
                raise TPJoinError(f"shm rank {self.rank}: a peer did not reach step {step} within {self.timeout_s} s")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.capacity:
            return self.fallback.all_reduce(tensor)
        step = self._step + 1
        bank = self._banks[step % 2]                                   # [T, capacity]
        self._wait_all(step - 1)                                       # bank free: step - 2 read by all
        flat = tensor.contiguous().view(-1)
        bank[self.rank, :nbytes].copy_(flat.view(torch.uint8))
        self._flags[self.rank] = step                                  # publish after the data
        self._wait_all(step)
        parts = bank[:, :nbytes].view(flat.dtype)                      # [T, numel]
        total = parts[0].clone()
        for part in parts[1:]:                                         # rank order: same bits everywhere
            total += part
        self._step = step
        tensor.copy_(total.view(tensor.shape))
        return tensor

    def close(self) -> None:
        self._flags = self._banks = None  # views of the mapping: dropped before it closes
        self._map.close()
