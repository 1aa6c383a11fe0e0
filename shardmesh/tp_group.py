"""TPGroup: the one owner of a tensor-parallel group's topology (rank, world size) and its AllReduce.

Every parallel layer (`shardmesh.models.parallel`) asks its group; nothing else computes ranks.

    group = GlooGroup(rank=1, world_size=2, rendezvous="127.0.0.1:29500", timeout_s=30)
    partial_sum = group.all_reduce(partial_sum)   # every rank gets the sum, in place

Implementations:
    SingleGroup   world size 1: all_reduce is the identity (no TP).
    ThreadGroup   in-process, ranks as threads of one process (unit tests): the sum is taken in
                  rank order, so it is deterministic.
    GlooGroup     torch.distributed's gloo backend over TCP; rank 0 hosts the rendezvous store at
                  `rendezvous` (host:port). Built on `ProcessGroupGloo` directly, not on the global
                  default group, so several groups may live in one process (threads, tests).
    NcclGroup     the same rendezvous and join, NCCL's AllReduce on the shard's CUDA device (no host
                  copy). NCCL puts at most one rank of a communicator on one GPU.

`group_class(device)` picks: NcclGroup for shards on CUDA, GlooGroup otherwise.
"""

import datetime
import random
import socket
import threading
import typing

import torch
import torch.distributed as dist

from shardmesh.errors import Unavailable


class TPJoinError(RuntimeError):
    """A rank could not form (or lost) its group within the timeout; the message says which and why."""


class TPStepFailed(Unavailable):
    """A step that failed on some ranks (their expert calls), agreed on by every rank at the same
    collective (`all_reduce_agreeing`): every rank raises it there, so no rank commits the step's
    KV and every rank has run the same collectives: the group stays usable for the next step."""

    MARKER = "failed on every rank of its tensor-parallel group"  # in the message: tells it from a lost shard


def all_reduce_agreeing(group: "TPGroup", flat: torch.Tensor, failed: bool) -> tuple[torch.Tensor, list[int]]:
    """Sum `flat` [M + world_size] over the group, whose last world_size elements are failure flags:
    this rank sets its own (index M + rank) when `failed`. One collective carries both the data and
    the agreement. Returns (the sum, the ranks that failed, in order: the same list on every rank)."""
    world_size = group.world_size
    flat[flat.numel() - world_size + group.rank] = 1.0 if failed else 0.0
    reduced = group.all_reduce(flat)
    flags = reduced[reduced.numel() - world_size:]
    return reduced, [rank for rank in range(world_size) if float(flags[rank]) > 0.5]


class TPGroup(typing.Protocol):
    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over every rank of the group; returns the sum (the same tensor, filled in place,
        where the backend allows). Every rank must call it with the same shape and dtype."""
        ...


class SingleGroup:
    """No tensor parallelism: one rank, all_reduce returns its input."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


SINGLE = SingleGroup()


class ThreadGroup:
    """Ranks that are threads of one process (tests). `ThreadGroup.create(n)` -> one group object per rank."""

    def __init__(self, rank: int, shared: "_ThreadShared"):
        self.rank, self.world_size, self._shared = rank, shared.world_size, shared

    @classmethod
    def create(cls, world_size: int, timeout_s: float = 60.0) -> list["ThreadGroup"]:
        shared = _ThreadShared(world_size, timeout_s)
        return [cls(rank, shared) for rank in range(world_size)]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        shared = self._shared
        shared.parts[self.rank] = tensor
        try:
            shared.barrier.wait(shared.timeout_s)          # every rank has deposited its part
            total = shared.parts[0].clone()
            for part in shared.parts[1:]:                   # rank order: the same sum on every rank
                total += part
            shared.barrier.wait(shared.timeout_s)          # every rank has read every part
        except threading.BrokenBarrierError:
            raise TPJoinError(f"rank {self.rank}: a peer did not reach all_reduce within {shared.timeout_s} s")
        tensor.copy_(total)
        return tensor


class _ThreadShared:
    def __init__(self, world_size: int, timeout_s: float):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.parts: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size)


_handed_out: set[int] = set()  # free_port's answers in this process


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server (a rendezvous, a service in a test) that binds it moments or
    seconds later; never the same one twice in a process. Taken below the OS's ephemeral range when
    there is room (10000 up to it): every outgoing connection takes its local port from that range,
    so one made meanwhile cannot take this port (a port the OS picks by bind(host, 0) is in it)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ephemeral:
            low = int(ephemeral.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the OS's choice
        low = 0
    candidates = random.sample(range(10000, low), min(64, low - 10000)) if low > 10000 else []
    for port in [*candidates, 0]:  # 0: the OS's choice, when none of those is free
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            port = probe.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError(f"no free port on {host}")


def parse_rendezvous(rendezvous: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:port') -> (host, port); ValueError naming what is wrong."""
    host, sep, port = rendezvous.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous {rendezvous!r} is not host:port")
    return host.strip("[]"), int(port)


class GlooGroup:
    """A gloo process group over TCP. Rank 0 hosts the rendezvous store (binds `rendezvous`'s port;
    port 0 lets the OS choose, read it back from `.port`); the constructor returns once all
    `world_size` ranks have joined, or raises TPJoinError after `timeout_s` (the join timeout) —
    never hangs. Each all_reduce then fails after `collective_timeout_s` (default: `timeout_s`)
    when a peer does not take part (gloo notices a peer whose process died at once)."""

    def __init__(self, rank: int, world_size: int, rendezvous: str, timeout_s: float = 30.0,
                 name: str = "tp", store: "dist.TCPStore | None" = None, collective_timeout_s: float | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size, self.name = rank, world_size, name
        host, port = parse_rendezvous(rendezvous)
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            self.store = store or dist.TCPStore(host, port, world_size, rank == 0, timeout, wait_for_workers=False)
            self.port = self.store.port
            # Join: every rank announces itself and waits for the others (the join timeout); only then
            # does gloo connect, with the collective timeout as its operations' timeout.
            self.store.set(f"{name}/joined/{rank}", "1")
            self.store.wait([f"{name}/joined/{r}" for r in range(world_size)], timeout)
            collective = datetime.timedelta(seconds=collective_timeout_s or timeout_s)
            self._group = self._process_group(dist.PrefixStore(name, self.store), collective)
        except (RuntimeError, dist.DistStoreError) as error:  # DistStoreError: a peer never joined
            raise TPJoinError(f"{name} rank {rank}/{world_size}: could not join the group at {rendezvous} "
                              f"within {timeout_s} s: {str(error).splitlines()[0]}") from error

    def _process_group(self, store: "dist.Store", timeout: datetime.timedelta):
        return dist.ProcessGroupGloo(store, self.rank, self.world_size, timeout)

    @staticmethod
    def host_store(host: str = "127.0.0.1", world_size: int = 1, timeout_s: float = 30.0) -> "dist.TCPStore":
        """A rank-0 rendezvous store on a port the OS chooses (`.port`), for groups formed in tests."""
        return dist.TCPStore(host, 0, world_size, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            self._group.allreduce([tensor]).wait()
        except RuntimeError as error:  # a peer died or timed out mid-collective
            raise TPJoinError(f"{self.name} rank {self.rank}: all_reduce failed: {str(error).splitlines()[0]}") from error
        return tensor


class NcclGroup(GlooGroup):
    """GlooGroup's rendezvous, join and errors; NCCL's AllReduce with every rank's tensors on its own
    GPU (`device`). NCCL forms the communicator at the first all_reduce (lazy init)."""

    def __init__(self, *args, device: str = "cuda:0", **kwargs):
        self.device = torch.device(device)
        super().__init__(*args, **kwargs)

    def _process_group(self, store: "dist.Store", timeout: datetime.timedelta):
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        torch.cuda.set_device(self.device)  # NCCL binds the current device of the thread that forms it
        return dist.ProcessGroupNCCL(store, self.rank, self.world_size, options)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        assert tensor.device == self.device, f"{self.name}: all_reduce of a {tensor.device} tensor on {self.device}"
        return super().all_reduce(tensor)  # wait(): the current stream waits for NCCL's


def group_class(device: str) -> type[GlooGroup]:
    """The TP group of shards on `device`: NCCL on CUDA, gloo on the CPU."""
    return NcclGroup if torch.device(device).type == "cuda" else GlooGroup
