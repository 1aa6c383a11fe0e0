"""ShmGroup: AllReduce through shared memory for the ranks of a TP group that share one host.

gloo's small-message latency (a TCP round trip per step of its algorithm) can cost more than the
layer it follows; ranks on one host can instead meet in one shared segment (as DeepSpeed's CPU
inference does): each rank copies its part into its slot and publishes a phase counter; then
  small tensors (< chunked_min_bytes): once every rank has published, each sums the T slots in rank
      order (one barrier; every rank reads T parts);
  larger ones: rank r sums only chunk r of the T slots (rank order) into the bank's result slot and
      publishes again; once all have, every rank copies the whole result (reduce-scatter, then
      all-gather: each rank reduces one chunk, then the chunks are shared with all).
Either way every rank gets the same bits.

Segment layout: flags int64 [T] (the last phase each rank published, one 64-byte line each), then
two banks (step parity) of T slots and one result slot of `capacity` bytes each. Writing step k
into bank k % 2 first waits until every rank has published all phases of step k - 1, i.e. has
finished reading step k - 2 from that bank (ranks make the same calls with the same sizes, so
their phase counts agree). A tensor larger than a slot goes through the fallback group (gloo).
Waiting polls briefly, then sleeps with backoff, and raises TPJoinError after `timeout_s` (or at
once after `abort`): never a hang.

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
CHUNKED_MIN_BYTES = 256 << 10  # from here on the two-phase (chunked) sum; see bench/allreduce.py


def host_id() -> str:
    """Who can map whose shared-memory segments: this boot of the kernel and the /dev/shm mount
    (device and inode: containers with their own /dev/shm differ). Shards of a TP stage advertise
    it (StageInfo.host_id); a group whose members all share it AllReduces through ShmGroup."""
    try:
        boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        mount = SHM_DIR.stat()
    except OSError:
        return ""  # unknown: never equal to anything (see same_host)
    return f"{boot}/{mount.st_dev}/{mount.st_ino}"


def same_host(host_ids: list[str]) -> bool:
    """True when every id is known and equal: the ranks may use ShmGroup."""
    return bool(host_ids) and all(host_ids) and len(set(host_ids)) == 1


class ShmGroup:
    """A TPGroup over a shared segment; `fallback` (same ranks) carries tensors larger than a slot."""

    def __init__(self, rank: int, world_size: int, path: pathlib.Path, capacity: int, fallback: TPGroup | None,
                 timeout_s: float = 30.0, create: bool = False):
        self.rank, self.world_size, self.capacity = rank, world_size, capacity
        self.fallback, self.timeout_s, self.path = fallback, timeout_s, path
        size = world_size * LINE + 2 * (world_size + 1) * capacity
        if create:
            with open(path, "wb") as file:
                file.truncate(size)
        with open(path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), size)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)  # [size]
        self._flags = raw[:world_size * LINE].view(torch.int64)[::LINE // 8]      # [T], one cache line each
        self._banks = raw[world_size * LINE:].view(2, world_size + 1, capacity)    # [2, T + 1 (result), capacity]
        self._step = 0   # all_reduce calls so far (picks the bank)
        self._phase = 0  # phases published so far (1 per small all_reduce, 2 per chunked one)
        self.chunked_min_bytes = CHUNKED_MIN_BYTES
        self._aborted = ""  # set (from any thread) when a peer is known lost: waits fail at once

    @staticmethod
    def supported() -> bool:
        return platform.machine() in ("x86_64", "AMD64") and SHM_DIR.is_dir()

    def abort(self, reason: str) -> None:
        """A peer is known lost (e.g. its process died): a rank waiting for it fails now, not after
        `timeout_s`. The group is unusable afterwards."""
        self._aborted = reason or "aborted"

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

    def _wait_all(self, phase: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        spins, pause = 0, 0.0
        while int(self._flags.min()) < phase:
            spins += 1
            if spins < SPINS:
                continue
            # Then sleep, backing off: a spinning rank must not take the core a late peer needs
            # (more shards than cores; ranks that are threads of one process share the GIL).
            pause = min(MAX_PAUSE_S, pause * 2 or 1e-5)
            time.sleep(pause)
            if self._aborted:
                raise TPJoinError(f"shm rank {self.rank}: phase {phase} aborted: {self._aborted}")
            if time.monotonic() > deadline:
                raise TPJoinError(f"shm rank {self.rank}: a peer did not reach phase {phase} within {self.timeout_s} s")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.capacity:
            return self.fallback.all_reduce(tensor)
        T, rank, phase = self.world_size, self.rank, self._phase
        bank = self._banks[(self._step + 1) % 2]                       # [T + 1, capacity]
        self._wait_all(phase)                                          # bank free: step - 2 read by all
        flat = tensor.contiguous().view(-1)                            # [numel]
        bank[rank, :nbytes].copy_(flat.view(torch.uint8))
        self._publish(phase + 1)                                       # after the data
        self._wait_all(phase + 1)
        parts = bank[:T, :nbytes].view(flat.dtype)                     # [T, numel]
        if nbytes < self.chunked_min_bytes:
            total = _sum_in_rank_order(parts)
            self._phase, self._step = phase + 1, self._step + 1
        else:
            numel = flat.numel()
            start, end = rank * numel // T, (rank + 1) * numel // T
            result = bank[T, :nbytes].view(flat.dtype)                 # [numel]
            result[start:end] = _sum_in_rank_order(parts[:, start:end])
            self._publish(phase + 2)
            self._wait_all(phase + 2)
            total = result
            self._phase, self._step = phase + 2, self._step + 1
        tensor.copy_(total.view(tensor.shape))
        return tensor

    def _publish(self, phase: int) -> None:
        self._flags[self.rank] = phase

    def close(self) -> None:
        self._flags = self._banks = None  # views of the mapping: dropped before it closes
        self._map.close()


def _sum_in_rank_order(parts: torch.Tensor) -> torch.Tensor:
    """parts [T, n] -> their sum [n], added in rank order (the same bits wherever it is taken)."""
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total
