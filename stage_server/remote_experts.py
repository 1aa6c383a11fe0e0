"""RemoteExperts: the ExpertBackend a stage uses to reach expert servers over gRPC.

For each MoE layer it spreads each expert's tokens over its replicas by least outstanding work
(tokens in flight; a big group is cut into pieces, see replica_spread.py), sends every piece bound
for one server in one message (packed in one tensor: packed_groups.py), and awaits all servers
concurrently. An expert with one replica skips the water-filling: its group goes whole to it; a
layer whose experts all lie, unreplicated, on one server (1 stage + 1 expert server) skips the
general path altogether: MoEGate.dispatch's packed tensor (PackedRows) goes out as it is, in one
call, and its answer comes back as one PackedRows for combine to read whole; moe_block goes through
`lend` (lent_call.py): the groups are dispatched into the call's shared-memory segment and the
answer read where it lies, no copy either way.

Failover: expert calls are stateless, so the pieces of a server that fails a call (UNAVAILABLE or
DEADLINE_EXCEEDED: dead, frozen, stopping, or a broken shared-memory plane) are sent again to the
other replicas of their experts within the same step, for at most MAX_ATTEMPTS rounds. The step
itself runs once: the stage's KV cache never sees the retry. The failed server is avoided for
DOWN_RETRY_S (the router's health probes drop it from the placement meanwhile, router/
expert_health.py) and called again as soon as a placement brings it back."""

import asyncio
import dataclasses
import functools
import time

import grpc
import torch

from shardmesh import codec
from shardmesh.errors import FailedPrecondition, Unavailable
from shardmesh.grpc_util import open_channel
from shardmesh.models.packed_rows import PackedRows
from shardmesh.nccl_dispatch import NcclLinks
from shardmesh.data_planes import DataPlanes
from shardmesh.shm_plane import DataPlaneError
from shardmesh.telemetry import metrics, tracing
from shardmesh.v1 import expert_pb2, expert_pb2_grpc

from stage_server.call_deadlines import CallDeadlines
from stage_server.lent_call import Lent
from stage_server.failover import DOWN_RETRY_S, MAX_ATTEMPTS, ServerFailed, with_failover  # noqa: F401 (re-exported)
from stage_server.packed_groups import PackedCall
from stage_server.replica_spread import sole_servers, spread

EXPERT_METHOD = "shardmesh.v1.Expert/ComputeExperts"
MIN_SPLIT_TOKENS = 16
# A call's deadline scales with its work: EXPERT_CALL_BASE_S for the round trip, queueing behind the
# server's other calls and scheduling (a ready process on a 2-core host at load average ~10 waits
# well under a second for a core; 5 s leaves room for a few such waits), plus the expert matmuls
# (6 * hidden * intermediate flops a row) at a pessimistic EXPERT_FLOPS_PER_S. A frozen server
# (SIGSTOP) fails a call within ~3 s over a connected gRPC channel (keepalive, below), and within
# the deadline otherwise (the shared-memory plane; a reconnect hanging on a frozen listener).
EXPERT_CALL_BASE_S = 5.0
EXPERT_FLOPS_PER_S = 1e10
# Stage -> expert channels ping every second and give up on a ping unanswered for 2 s: a frozen
# peer's calls fail within ~3 s whatever their deadline. Acks come from gRPC's own threads, not the
# server's (possibly busy) event loop, so a live server answers in time even at load ~10. A peer
# that comes back at the same address is reconnected within a second (reconnect backoff).
# (gRPC core also spaces pings sent while no data flows by min_time_between_pings, and gives any
# ping, a keepalive one that joined a ping already in flight included, ping_timeout to be acked:
# a minute each by default, which would hold back the very pings that find a frozen peer.)
FAST_FAILURE_OPTIONS = {"grpc.keepalive_time_ms": 1_000, "grpc.keepalive_timeout_ms": 2_000,
                        "grpc.http2.min_time_between_pings_ms": 1_000, "grpc.http2.ping_timeout_ms": 2_000,
                        "grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1_000}
FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclasses.dataclass(frozen=True)
class Placement:
    version: int
    replicas: dict[tuple[int, int], tuple[str, ...]]  # (layer, expert) -> addresses


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one expert's group in a layer."""
    expert: int
    start: int
    stop: int


class RemoteExperts:
    def __init__(self, security=None, data_plane: str = "grpc", device: str = "cpu", flops_per_row: float = 0.0):
        """device: the stage's (a CUDA device adds CUDA IPC to the shared-memory plane, cuda_ipc.py);
        flops_per_row: one expert's work on one token row (6 * hidden * intermediate), for deadlines."""
        self.security = security  # shardmesh.security.Security of the outgoing channels
        # Expert servers on this host are called over shared memory when they offer it.
        self.data_planes = DataPlanes(enabled=data_plane == "shm", device=device)
        # Or every expert server over an NCCL link (gloo on the CPU): shardmesh/nccl_dispatch.py.
        self.nccl_links = NcclLinks(device) if data_plane == "nccl" else None
        self.placement = Placement(0, {})
        self._sole: dict[int, tuple[str, frozenset[int]]] = {}  # layer -> its one server, its experts (sole_servers)
        self.flops_per_row = flops_per_row
        self._stubs: dict[str, expert_pb2_grpc.ExpertStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._in_flight: dict[str, int] = {}  # address -> tokens sent and not yet answered
        self._down: dict[str, float] = {}     # address -> monotonic time until which it is avoided
        # (layer, expert) -> its calls so far: a replicated expert's equal replicas take turns call by
        # call (one counter for all experts let another expert's groups set whose turn it was)
        self._turns: dict[tuple[int, int], int] = {}
        self.min_split_tokens = MIN_SPLIT_TOKENS  # a group is cut over replicas only into pieces this big
        self.server_name = "stage"  # the stage's name, for metrics (set by its servicer)
        self.failovers = 0  # pieces sent again to another replica after their server failed
        self.deadlines = CallDeadlines()  # the shared-memory calls' (_call): one timer for all

    async def update(self, placement: Placement) -> None:
        """Switch placement (between steps: the stage holds its step lock while calling this, so no
        call is in flight). Servers that left are disconnected (gRPC channel and shared memory);
        servers that (re)joined are called again at once, whatever failed before."""
        before = set(self._stubs)
        after = {a for addresses in placement.replicas.values() for a in addresses}
        self.placement = placement
        self._sole = sole_servers(placement.replicas)
        for address in after - before:
            self._channels[address] = open_channel(address, self.security, FAST_FAILURE_OPTIONS)
            self._stubs[address] = expert_pb2_grpc.ExpertStub(self._channels[address])
            self._in_flight[address] = 0
            self._down.pop(address, None)
        gone = before - after
        await self.data_planes.forget(gone)
        if self.nccl_links is not None:
            self.nccl_links.forget(gone)
        for address in gone:
            del self._stubs[address], self._in_flight[address]
            self._down.pop(address, None)
            await self._channels.pop(address).close()

    def connected(self) -> set[str]:
        """Addresses this stage holds a channel to (the placement's servers)."""
        return set(self._channels)

    async def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return await self._run(layer, groups, None)

    def lend(self, layer: int) -> "Lent":
        """`async with experts.lend(layer) as lent`: one call of `layer` (lent.run) whose packed groups
        may be written straight into a shared-memory segment (lent.rows: MoEGate.dispatch writes them
        there, the call sends them as they lie) and whose outputs are the answer where it lies (no
        copy). The session stays taken until the block ends: read the outputs inside it (moe_block
        combines them there). Anything else goes as run goes."""
        return Lent(self, layer)

    async def _run(self, layer: int, groups: dict[int, torch.Tensor], lent: "Lent | None") -> dict[int, torch.Tensor]:
        """run; lent: the Lent this call belongs to (its session, and the outputs may view it), or None."""
        sole = self._sole.get(layer)
        first = None  # a failed first attempt of the one-server path, for with_failover to go on from
        if groups and sole is not None and sole[1].issuperset(groups):
            # Every expert of the layer on one server, unreplicated (1 stage + 1 expert server, no EPLB
            # copies): the general path's spread and bookkeeping would send all of it there anyway.
            address = sole[0]
            packed = (PackedCall.of_rows(address, layer, groups) if type(groups) is PackedRows
                      else PackedCall(address, layer, list(groups), list(groups.values())))
            try:
                with tracing.span("moe.dispatch", layer=layer):  # a no-op context unless tracing is on
                    output = await self._call(address, packed, lent)  # [N, H]
            except ServerFailed as error:
                first = (address, [Piece(e, 0, n) for e, n in zip(packed.experts, packed.counts)], error)
                if lent is not None:  # the groups may lie in its session's segment: the re-sends read a copy
                    groups = (PackedRows(groups.rows.clone(), groups.experts, groups.counts) if type(groups) is PackedRows
                              else {e: x.clone() for e, x in groups.items()})
                    await lent.release()
            else:
                with tracing.span("moe.combine", layer=layer):
                    return PackedRows(output, tuple(packed.experts), tuple(packed.counts))  # combine reads it whole

        def assign(todo: list[Piece], avoid) -> dict[str, list[Piece]]:  # failed servers are down: _spread skips them
            by_server: dict[str, list[Piece]] = {}
            for piece in todo:  # a hot expert's rows may be cut into pieces over its replicas
                start = piece.start
                for address, count in self._spread(layer, piece.expert, piece.stop - piece.start):
                    by_server.setdefault(address, []).append(Piece(piece.expert, start, start + count))
                    start += count
            return by_server

        todo = [Piece(expert, 0, rows.shape[0]) for expert, rows in groups.items()]
        outputs = await with_failover(self, layer, todo, assign,  # piece -> its output rows [stop - start, H]
                                      lambda address, pieces: self._call_pieces(address, layer, pieces, groups),
                                      lambda pieces: f"{sum(p.stop - p.start for p in pieces)} rows", "", first)
        with tracing.span("moe.combine", layer=layer):
            if len(outputs) == len(groups):  # one piece per expert: every group answered whole, nothing to join
                return {piece.expert: output for piece, output in outputs.items()}
            done: dict[int, list[Piece]] = {}
            for piece in sorted(outputs, key=lambda p: (p.expert, p.start)):
                done.setdefault(piece.expert, []).append(piece)
            return {expert: outputs[pieces[0]] if len(pieces) == 1 else torch.cat([outputs[p] for p in pieces])
                    for expert, pieces in done.items()}

    def _spread(self, layer: int, expert: int, num_tokens: int) -> list[tuple[str, int]]:
        addresses = self.placement.replicas.get((layer, expert))
        if not addresses:
            raise FailedPrecondition("placement", f"no expert server holds (layer {layer}, expert {expert})")
        if len(addresses) == 1:  # one replica (most experts): the group goes to it whole, down or not
            return [(addresses[0], num_tokens)]
        turn = self._turns[(layer, expert)] = self._turns.get((layer, expert), 0) + 1
        now = time.monotonic()
        live = tuple(a for a in addresses if self._down.get(a, 0.0) <= now)
        # Every replica failed lately: try them all again (one may be back) rather than give up.
        return spread(num_tokens, live or addresses, self._in_flight, self.min_split_tokens, turn)

    def deadline(self, rows: int) -> float:
        """Seconds a call of `rows` token rows may take before its server counts as failed."""
        return EXPERT_CALL_BASE_S + rows * self.flops_per_row / EXPERT_FLOPS_PER_S

    async def _call_pieces(self, address: str, layer: int, pieces: list[Piece],
                           groups: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """One server's pieces -> their outputs, in order. ServerFailed if the server failed."""
        # each [rows, H]: a whole group as it is (a slice costs a tensor op per piece, every layer)
        inputs = [groups[p.expert] if p.start == 0 and p.stop == groups[p.expert].shape[0]
                  else groups[p.expert][p.start:p.stop] for p in pieces]
        packed = PackedCall(address, layer, [p.expert for p in pieces], inputs)  # one tensor each way
        output = await self._call(address, packed)  # [N, H]
        return list(output.split_with_sizes(packed.counts)) if len(packed.counts) > 1 else [output]

    async def _call(self, address: str, packed: PackedCall, lent: "Lent | None" = None) -> torch.Tensor:
        """One ComputeExperts call -> its checked answer [N, H]. ServerFailed if the server failed.
        lent: when it holds a session, the call goes over it and the answer is a view of its segment."""
        rows = packed.hidden_states.shape[0]
        self._in_flight[address] += rows
        timeout = self.deadline(rows)
        started = time.perf_counter()
        try:
            if lent is not None and lent.call is not None:  # the lent session: groups and answer lie in its segment
                call, lent.call, placed = lent.call, None, lent.placed  # one call per lend
                # the rows dispatched into the segment (Lent.rows) go by their span; anything else is encoded
                request = packed.request(call.encode, placed[1] if placed is not None
                                         and placed[0] is packed.hidden_states else None)
                with self.deadlines.bound(timeout):  # (as asyncio.timeout, without a timer per call)
                    reply = await call.invoke(EXPERT_METHOD, request, expert_pb2.ComputeExpertsResponse, None)
                    return packed.output(reply, call.view)  # valid while the lend holds the session
            pool = self.data_planes.ready(address) if self.nccl_links is None else None
            session = pool.idle_session() if pool is not None else None
            if session is not None:  # (most calls) a shared-memory session free now: nothing to wait for first
                with self.deadlines.bound(timeout):
                    async with session as call:
                        reply = await call.invoke(EXPERT_METHOD, packed.request(call.encode),
                                                  expert_pb2.ComputeExpertsResponse, None)
                        return packed.output(reply, call.decode)
            # One bound over negotiating the shared-memory plane, waiting for its session and the call.
            async with asyncio.timeout(timeout + 1.0) as bound:
                if self.nccl_links is not None:
                    return await self._call_over_nccl(address, packed, timeout)
                shm = await self.data_planes.get(address, self._channels[address])
                if shm is not None:
                    async with shm.session() as call:  # tensors through shared memory
                        # the call itself gets `timeout` from now: this bound, not one more of its own
                        bound.reschedule(min(bound.when(), asyncio.get_running_loop().time() + timeout))
                        reply = await call.invoke(EXPERT_METHOD, packed.request(call.encode),
                                                  expert_pb2.ComputeExpertsResponse, None)
                        return packed.output(reply, call.decode)
                reply = await self._stubs[address].ComputeExperts(
                    packed.request(functools.partial(codec.encode, arena=None)), timeout=timeout)
                return packed.output(reply, functools.partial(codec.decode, segment=None))
        except (grpc.aio.AioRpcError, DataPlaneError, TimeoutError) as error:
            code = error.code() if isinstance(error, grpc.aio.AioRpcError) else getattr(
                error, "code", grpc.StatusCode.DEADLINE_EXCEEDED)
            details = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error) or "timed out"
            message = f"expert server {address} failed layer {packed.layer}: {code.name} {details}"
            if self.nccl_links is not None:
                self.nccl_links.forget([address])  # the link may be out of step: a new one next time
            if code in FAILOVER_CODES:
                # A shared-memory session that failed or was cut mid-call marked itself broken: its pool
                # closes it (and its idle ones) while the other calls in flight to `address` go on.
                raise ServerFailed(message) from error
            raise Unavailable("experts", message) from error
        finally:
            self._in_flight[address] -= rows
            nbytes = packed.hidden_states.nbytes  # answers are the same size
            metrics.data_plane_call(self.server_name, "stage_expert", address, started, nbytes, nbytes)

    async def _call_over_nccl(self, address: str, packed: PackedCall, timeout: float) -> torch.Tensor:
        link = await self.nccl_links.get(address, self._channels[address], self.server_name)
        async with link.call() as call:  # tensors beside the call, over the link
            reply = await call.invoke(self._stubs[address].ComputeExperts, packed.request(call.encode), timeout)
            return packed.output(reply, call.decode)

    async def close(self) -> None:
        self.deadlines.close()
        await self.data_planes.close()
        for channel in self._channels.values():
            await channel.close()
