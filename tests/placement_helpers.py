"""What the live-placement tests share: raw calls to the router's status and Admin RPCs and to
expert servers, and a recorder of concurrent generations that notes when each token arrived."""

import asyncio
import dataclasses

import torch

from shardmesh import grpc_util
from shardmesh.client import AsyncClient
from shardmesh.v1 import (admin_pb2, admin_pb2_grpc, expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc)

from mesh_helpers import topology

# Three expert servers, the third empty (capacity the router can assign), two stages.
SPARE_TOPOLOGY = topology([(0, 2), (2, 4)], [[0, 1, 2, 3], [4, 5, 6, 7], []])


async def cluster_status(address: str, load: bool = True, window: float = 600) -> router_pb2.ClusterStatus:
    async with grpc_util.insecure_channel(address) as channel:
        return await router_pb2_grpc.RouterStub(channel).GetClusterStatus(
            router_pb2.GetClusterStatusRequest(include_expert_load=load, load_window_seconds=window), timeout=30)


async def rebalance(address: str, **fields) -> admin_pb2.RebalanceResponse:
    async with grpc_util.insecure_channel(address) as channel:
        return await admin_pb2_grpc.AdminStub(channel).Rebalance(admin_pb2.RebalanceRequest(**fields), timeout=120)


def expert_addresses(status: router_pb2.ClusterStatus) -> dict[str, str]:
    """Expert server name -> address."""
    return {s.name: s.address for s in status.servers if s.role == router_pb2.SERVER_ROLE_EXPERT}


def target_by_address(placement: dict[str, set[tuple[int, int]]]) -> list[admin_pb2.ServerExperts]:
    """A Rebalance target from address -> experts."""
    return [admin_pb2.ServerExperts(address=address, experts=[
        router_pb2.ExpertKey(layer=l, expert=e) for l, e in sorted(keys)]) for address, keys in placement.items()]


async def expert_tokens(address: str) -> dict[tuple[int, int], int]:
    """Tokens per (layer, expert) an expert server computed since it started."""
    async with grpc_util.insecure_channel(address) as channel:
        report = await expert_pb2_grpc.ExpertStub(channel).GetExpertLoad(expert_pb2.GetExpertLoadRequest(), timeout=10)
    return {(t.layer, t.expert): t.tokens for t in report.tokens}


async def expert_held(address: str) -> set[tuple[int, int]]:
    async with grpc_util.insecure_channel(address) as channel:
        info = await expert_pb2_grpc.ExpertStub(channel).GetExpertInfo(expert_pb2.GetExpertInfoRequest(), timeout=10)
    return {(k.layer, k.expert) for k in info.experts}


@dataclasses.dataclass
class Recorded:
    indexes: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


class Generations:
    """Several greedy generations at once; `progress.wait(n)` waits until the first has n tokens."""

    def __init__(self, address: str, prompts: list[list[int]], max_new_tokens: int):
        self.address, self.prompts, self.max_new_tokens = address, prompts, max_new_tokens
        self.results = [Recorded() for _ in prompts]
        self._progress = asyncio.Condition()
        self.ended = False

    async def wait_first(self, tokens: int, timeout: float = 120) -> None:
        """Until the first generation has `tokens` tokens; raises if the generations ended first
        (failed) or after `timeout` s."""
        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(
                lambda: len(self.results[0].tokens) >= tokens or self.ended), timeout)
        assert len(self.results[0].tokens) >= tokens, f"generations ended early: {self.counts()}"

    def counts(self) -> list[int]:
        return [len(r.tokens) for r in self.results]

    async def run(self) -> list[Recorded]:
        async with AsyncClient(self.address, timeout=300) as client:
            async def one(i: int):
                async for token in client.generate(self.prompts[i], max_new_tokens=self.max_new_tokens,
                                                   ignore_eos=True, return_logits=True):
                    record = self.results[i]
                    record.indexes.append(token.index)
                    record.tokens.append(token.token_id)
                    record.logits.append(torch.tensor(token.logits))
                    record.finish_reason = token.finish_reason
                    async with self._progress:
                        self._progress.notify_all()

            try:
                await asyncio.gather(*(one(i) for i in range(len(self.prompts))))
            finally:
                self.ended = True
                async with self._progress:
                    self._progress.notify_all()
        return self.results
