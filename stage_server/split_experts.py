"""SplitExperts: the stage's ExpertBackend when some experts are split tensor-parallel over several
expert servers (the topology's [[split_expert]]; the math in shardmesh.split_expert).

Whole experts go through `RemoteExperts` (replicas, shared-memory plane) unchanged. The tokens of
a split expert go to a server holding each of its slices, all at once, each group tagged with
its slice (a server that does not hold exactly that slice answers NOT_FOUND: misrouting fails
loudly); the partial outputs are summed in slice order, then the MoE block combines as usual.

Deadlines and failover as RemoteExperts' (stage_server/remote_experts.py): each call's deadline
grows with its rows (RemoteExperts.deadline), channels fail fast on a frozen peer (keepalive),
and a slice whose server fails a call (UNAVAILABLE / DEADLINE_EXCEEDED) is sent again, within the
same step, to another replica of that slice (a scaled expert service: ExpertLocation.slice_replicas),
for at most MAX_ATTEMPTS rounds; the failed server is avoided for DOWN_RETRY_S.

Shape legend: n tokens routed to one expert, H hidden_size.
"""

import asyncio
import functools
import time

import grpc
import torch

from shardmesh import codec
from shardmesh.errors import InvalidArgument, Unavailable
from shardmesh.grpc_util import open_channel
from shardmesh.split_expert import sum_slices
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, stage_pb2

from stage_server.failover import ServerFailed, checked_outputs, with_failover
from stage_server.remote_experts import FAILOVER_CODES, FAST_FAILURE_OPTIONS, RemoteExperts

ExpertKey = tuple[int, int]
SliceReplicas = tuple[tuple[str, ...], ...]  # at index r: the addresses of slice r's replicas


def slice_replicas(location: stage_pb2.ExpertLocation, field: str, check_address) -> SliceReplicas:
    """A split expert's ExpertLocation -> its slices' replicas (slice_addresses[r] first), checked;
    InvalidArgument naming the field (`field` is the location's, e.g. "locations[3]")."""
    if location.addresses or len(location.slice_addresses) < 2:
        raise InvalidArgument(f"{field}.slice_addresses", "a split expert needs >= 2 slice addresses and no "
                              "whole-expert addresses")
    if location.slice_replicas and len(location.slice_replicas) != len(location.slice_addresses):
        raise InvalidArgument(f"{field}.slice_replicas", f"{len(location.slice_replicas)} entries for "
                              f"{len(location.slice_addresses)} slices")
    slices = []
    for r, first in enumerate(location.slice_addresses):
        others = location.slice_replicas[r].addresses if location.slice_replicas else ()
        replicas = [check_address(first, f"{field}.slice_addresses[{r}]")]
        replicas += [check_address(a, f"{field}.slice_replicas[{r}].addresses[{j}]")
                     for j, a in enumerate(others) if a != first]
        slices.append(tuple(replicas))
    return tuple(slices)


class SplitExperts:
    def __init__(self, inner: RemoteExperts, security=None):
        self.inner = inner                                 # whole experts; its deadline() serves here too
        self.security = security
        self.slices: dict[ExpertKey, SliceReplicas] = {}   # (layer, expert) -> replicas of slice 0, 1, ...
        self._stubs: dict[str, expert_pb2_grpc.ExpertStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._down: dict[str, float] = {}  # address -> monotonic time until which it is avoided
        self._turn = 0
        self.failovers = 0  # slice calls sent again to another replica after their server failed

    @property
    def server_name(self) -> str:  # the stage's, for logs
        return self.inner.server_name

    def update(self, slices: dict[ExpertKey, SliceReplicas]) -> None:
        """Switch where the split experts' slices are (between steps, under the stage's step lock)."""
        self.slices = dict(slices)
        for address in {a for replicas in slices.values() for addresses in replicas for a in addresses}:
            if address not in self._stubs:
                self._channels[address] = open_channel(address, self.security, FAST_FAILURE_OPTIONS)
                self._stubs[address] = expert_pb2_grpc.ExpertStub(self._channels[address])
                self._down.pop(address, None)

    def lend(self, layer: int):
        """RemoteExperts.lend when no expert of `layer` is split, else run's way (copies) in its form."""
        if not self.slices or not any(key[0] == layer for key in self.slices):
            return self.inner.lend(layer)
        return _Ran(self, layer)

    async def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """groups: expert id -> hidden_states [n_e, H]; returns expert id -> output [n_e, H]."""
        if not self.slices or not any((layer, e) in self.slices for e in groups):  # (no per-expert views made)
            return await self.inner.run(layer, groups)
        split = {e: x for e, x in groups.items() if (layer, e) in self.slices}
        whole = {e: x for e, x in groups.items() if e not in split}
        whole_outputs = asyncio.ensure_future(self.inner.run(layer, whole) if whole else _nothing())
        try:
            partials = await self._slices(layer, split)
        finally:
            outputs = dict(await whole_outputs)  # (a read-only mapping: PackedRows)
        for expert in split:
            outputs[expert] = sum_slices([partials[(expert, r)] for r in range(len(self.slices[(layer, expert)]))])
        return outputs

    async def _slices(self, layer: int, split: dict[int, torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
        """(expert, slice rank) -> partial output [n_e, H] of every slice of the `split` experts."""
        def assign(todo: list[tuple[int, int]], avoid) -> dict[str, list[tuple[int, int]]]:
            by_server: dict[str, list[tuple[int, int]]] = {}
            for part in todo:
                by_server.setdefault(self._pick(layer, part, avoid.get(part, set())), []).append(part)
            return by_server

        todo = [(expert, rank) for expert in split for rank in range(len(self.slices[(layer, expert)]))]
        return await with_failover(self, layer, todo, assign, lambda address, parts: self._call(address, layer, parts, split),
                                   lambda parts: f"{len(parts)} slices", "of a split expert's slice ")

    def _pick(self, layer: int, part: tuple[int, int], failed: set[str]) -> str:
        """A replica of slice part[1] of expert part[0]: one not failed in this step nor down lately,
        in turn; else (every replica failed) one not failed in this step, else any."""
        replicas = self.slices[(layer, part[0])][part[1]]
        now = time.monotonic()
        candidates = ([a for a in replicas if a not in failed and self._down.get(a, 0.0) <= now]
                      or [a for a in replicas if a not in failed] or list(replicas))
        self._turn += 1
        return candidates[self._turn % len(candidates)]

    async def _call(self, address: str, layer: int, parts: list[tuple[int, int]],
                    groups: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """One server's slices -> their partial outputs, in order; _ServerFailed when another replica may do."""
        count = {expert: len(self.slices[(layer, expert)]) for expert, _ in parts}
        request = expert_pb2.ComputeExpertsRequest(groups=[
            expert_pb2.ExpertGroup(layer=layer, expert=expert, hidden_states=codec.encode(groups[expert], arena=None),
                                   slice_rank=rank, slice_count=count[expert]) for expert, rank in parts])
        timeout = self.inner.deadline(sum(groups[expert].shape[0] for expert, _ in parts))
        try:
            reply = await self._stubs[address].ComputeExperts(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            message = (f"expert server {address} failed a slice of layer {layer}: "
                       f"{error.code().name} {error.details()}")
            if error.code() in FAILOVER_CODES:
                raise ServerFailed(message) from error
            raise Unavailable("experts", message) from error
        return checked_outputs(address, [groups[expert] for expert, _ in parts], reply,
                               functools.partial(codec.decode, segment=None))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class _Ran:
    """lend's form of run: no shared-memory session of its own (rows None), outputs that are copies."""

    def __init__(self, backend, layer: int):
        self.backend, self.layer = backend, layer

    async def __aenter__(self) -> "_Ran":
        return self

    def rows(self, count: int, width: int, dtype: torch.dtype) -> None:
        return None

    async def run(self, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return await self.backend.run(self.layer, groups)

    async def __aexit__(self, kind, error, traceback) -> bool:
        return False


async def _nothing() -> dict[int, torch.Tensor]:
    return {}
