"""Expert load accounting at the router: ask every expert server process for what it computed
over a window (Expert.GetExpertLoad, concurrently, each with a deadline) and put it together per
(layer, expert) and per server.

Why the expert servers and not the stages: every token of every stage ends up on exactly one
expert server, so their counts summed over replicas are the gate's load per (layer, expert); they
alone know their busy time; and they show how dispatch split a hot expert over its replicas."""

import asyncio
import dataclasses

import grpc

from shardmesh.errors import InvalidArgument
from shardmesh.grpc_util import CONTROL_DEADLINE_S, open_channel
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2

DEFAULT_WINDOW_S = 60.0
MAX_WINDOW_S = 600.0

ExpertKey = tuple[int, int]


@dataclasses.dataclass
class ServerLoad:
    name: str
    address: str
    experts: tuple[ExpertKey, ...]       # what the placement gives it
    tokens: dict[ExpertKey, int]         # what it computed in the window
    busy_seconds: float = 0.0
    window_seconds: float = 0.0
    error: str = ""                      # why the figures are missing

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())


@dataclasses.dataclass
class LoadSnapshot:
    window_seconds: float
    servers: list[ServerLoad]

    def expert_tokens(self) -> dict[ExpertKey, int]:
        """Tokens per (layer, expert), summed over every server that computed it."""
        totals: dict[ExpertKey, int] = {}
        for server in self.servers:
            for key, tokens in server.tokens.items():
                totals[key] = totals.get(key, 0) + tokens
        return totals

    def imbalance(self) -> float:
        """Busiest server's tokens / mean over servers that answered (1 = even, 0 = no load)."""
        answered = [s.total_tokens for s in self.servers if not s.error]
        mean = sum(answered) / len(answered) if answered else 0
        return max(answered) / mean if mean > 0 else 0.0


def check_window(window_seconds: float, field: str = "load_window_seconds") -> float:
    """The window a request asks for (0 = the default), refusing what is out of range (or NaN)."""
    if not 0 <= window_seconds <= MAX_WINDOW_S:
        raise InvalidArgument(field, f"{window_seconds} is outside [0, {MAX_WINDOW_S:g}]")
    return window_seconds or DEFAULT_WINDOW_S


async def collect_load(holdings: dict[str, tuple[str, tuple[ExpertKey, ...]]], window_seconds: float,
                       security=None, timeout: float = CONTROL_DEADLINE_S) -> LoadSnapshot:
    """holdings: address -> (name, experts placed there) (ClusterMap.expert_holdings). A server
    that does not answer in time is listed with its error and no tokens."""

    async def one(address: str, name: str, experts) -> ServerLoad:
        load = ServerLoad(name, address, experts, {})
        try:
            async with open_channel(address, security) as channel:
                report = await expert_pb2_grpc.ExpertStub(channel).GetExpertLoad(
                    expert_pb2.GetExpertLoadRequest(window_seconds=window_seconds), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            load.error = f"{error.code().name}: {error.details()}"
            return load
        load.tokens = {(t.layer, t.expert): t.tokens for t in report.tokens}
        load.busy_seconds, load.window_seconds = report.busy_seconds, report.window_seconds
        return load

    servers = await asyncio.gather(*(one(a, n, e) for a, (n, e) in holdings.items()))
    return LoadSnapshot(window_seconds, list(servers))


async def add_load_to_status(status: router_pb2.ClusterStatus, request: router_pb2.GetClusterStatusRequest,
                             state) -> None:
    """GetClusterStatus with include_expert_load: collect and fill (state: router.main.RouterState)."""
    window = check_window(request.load_window_seconds)
    if not state.config.is_moe:
        return
    snapshot = await collect_load(state.cluster.expert_holdings(), window, state.security)
    fill_status(status, snapshot, state.config.num_layers, state.config.num_experts)


def fill_status(status: router_pb2.ClusterStatus, snapshot: LoadSnapshot, num_layers: int, num_experts: int) -> None:
    """Add the snapshot to a ClusterStatus (expert_load for every (layer, expert) of the model)."""
    replicas: dict[ExpertKey, list[ServerLoad]] = {}
    for server in snapshot.servers:
        for key in server.experts:
            replicas.setdefault(key, []).append(server)
    totals = snapshot.expert_tokens()
    for layer in range(num_layers):
        for expert in range(num_experts):
            key = (layer, expert)
            holders = replicas.get(key, [])
            status.expert_load.add(layer=layer, expert=expert, tokens=totals.get(key, 0),
                                   replica_addresses=[s.address for s in holders],
                                   replica_tokens=[s.tokens.get(key, 0) for s in holders])
    for server in snapshot.servers:
        status.expert_servers.add(name=server.name, address=server.address, experts=len(server.experts),
                                  tokens=server.total_tokens, busy_seconds=server.busy_seconds,
                                  window_seconds=server.window_seconds, error=server.error)
    status.load_window_seconds = snapshot.window_seconds
    status.load_imbalance = snapshot.imbalance()
