"""Tensor-parallel groups formed through the control plane (router/tp_ranks.py,
stage_server/tp_rank.py): the router assigns shards their ranks and hands out rank 0's rendezvous.

Unit tests of the router's rank table on a fake clock, then in-process meshes over real gRPC on
loopback: shards started with no rank form their group and serve transformers' tokens; a shard
whose rendezvous does not come leaves its stage NOT_SERVING with the reason, never a hang, and
keeps waiting: the group forms once its rank 0 starts."""

import asyncio
import dataclasses
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oracle import reference_greedy
from router.main import start_router
from router.tp_ranks import TPRanks
from shardmesh import grpc_util
from shardmesh.client import AsyncClient, UnavailableError
from shardmesh.config import ModelConfig
from shardmesh.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shardmesh.service_config import ServiceConfig
from shardmesh.topology import StageSpec, Topology
from shardmesh.tp_group import free_port
from shardmesh.v1 import router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc
from stage_server.main import start_stage_server
from stage_server.tp_rank import RouterRanks
from test_mesh_features import wait_until

TOPOLOGY = Topology((StageSpec("stage-0", 0, 2, 2), StageSpec("stage-1", 2, 4)))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ask(table: TPRanks, config: ModelConfig, shard_id: str, rank: int | None = None, rendezvous: str = "",
        name: str = "stage-0", layers=(0, 2), starting: bool = False, generation: int = 0,
        lost: bool = False) -> router_pb2.TensorParallelAssignment:
    shard = router_pb2.TensorParallelShard(shard_id=shard_id, rendezvous=rendezvous, starting=starting,
                                           generation=generation, group_lost=lost)
    if rank is not None:
        shard.rank = rank
    request = router_pb2.RegisterServerRequest(name=name, role=router_pb2.SERVER_ROLE_STAGE,
                                               model_fingerprint=config.fingerprint, tp_shard=shard,
                                               layers=router_pb2.LayerRange(start=layers[0], end=layers[1]))
    return table.answer(request).tp


def test_ranks_in_arrival_order_the_same_id_keeps_its_rank_and_rank_0_gives_the_rendezvous(llama_dir):
    config = ModelConfig.from_dir(llama_dir)
    table = TPRanks(TOPOLOGY.validate(config), config, lease_s=30, clock=Clock())
    first, second = ask(table, config, "a"), ask(table, config, "b")
    assert (first.rank, first.world_size, first.rendezvous) == (0, 2, "")
    assert (second.rank, second.world_size, second.rendezvous) == (1, 2, "")
    assert ask(table, config, "b").rank == 1 and ask(table, config, "a", rank=0).rank == 0
    assert ask(table, config, "a", rank=0, rendezvous="10.0.0.7:4242").rendezvous == "10.0.0.7:4242"
    assert ask(table, config, "b", rank=1).rendezvous == "10.0.0.7:4242"
    assert ask(table, config, "a", rank=0).rendezvous == "10.0.0.7:4242"  # a heartbeat built before it gave it
    # Rank 0 starting again (a restart with the same id): the old store is gone.
    assert ask(table, config, "a", starting=True).rendezvous == ""
    assert [(s.rank, s.shard_id) for s in table.shards("stage-0")] == [(0, "a"), (1, "b")]
    assert table.shards("stage-1") == []


def test_a_full_stage_refuses_new_shards_until_a_holder_stops_asking(llama_dir):
    config, clock = ModelConfig.from_dir(llama_dir), Clock()
    table = TPRanks(TOPOLOGY.validate(config), config, lease_s=30, clock=clock)
    ask(table, config, "a", rendezvous="")
    ask(table, config, "a", rank=0, rendezvous="h:1")
    ask(table, config, "b")
    with pytest.raises(Unavailable, match="every rank of 'stage-0' is held by a live shard"):
        ask(table, config, "c")
    clock.now += 20
    ask(table, config, "a", rank=0, rendezvous="h:1")  # a keeps asking, b does not
    clock.now += 15
    assert ask(table, config, "c").rank == 1  # b's lease ran out
    with pytest.raises(FailedPrecondition, match="rank 1 of 'stage-0' is held by 'c'"):
        ask(table, config, "b", rank=1)  # b comes back claiming its old rank
    clock.now += 40
    fresh = ask(table, config, "d", starting=True)  # every lease ran out: rank 0 first, no stale rendezvous
    assert (fresh.rank, fresh.rendezvous) == (0, "")


def test_a_router_that_restarted_adopts_the_ranks_its_shards_claim(llama_dir):
    config = ModelConfig.from_dir(llama_dir)
    table = TPRanks(TOPOLOGY.validate(config), config, clock=Clock())
    assert ask(table, config, "b", rank=1).rank == 1
    assert ask(table, config, "a", rank=0, rendezvous="h:9").rendezvous == "h:9"
    with pytest.raises(Unavailable):
        ask(table, config, "c")  # both ranks adopted: the stage is full
    with pytest.raises(FailedPrecondition, match="holds rank 1 of 'stage-0', not 0"):
        ask(table, config, "b", rank=0)


@pytest.mark.parametrize("change, error, field", [
    (dict(name="stage-9"), NotFound, "name"),
    (dict(name="stage-1", layers=(2, 4)), FailedPrecondition, "tp_shard"),
    (dict(layers=(0, 3)), FailedPrecondition, "layers"),
    (dict(shard_id=""), InvalidArgument, "tp_shard.shard_id"),
    (dict(shard_id="x" * 254), InvalidArgument, "tp_shard.shard_id"),
    (dict(shard_id="a\nb"), InvalidArgument, "tp_shard.shard_id"),
    (dict(rank=2), InvalidArgument, "tp_shard.rank"),
    (dict(rendezvous="nohost"), InvalidArgument, "tp_shard.rendezvous"),
    (dict(rendezvous="h:99999"), InvalidArgument, "tp_shard.rendezvous"),
    (dict(rank=1, rendezvous="h:1"), FailedPrecondition, "tp_shard.rendezvous"),
])
def test_bad_rank_requests_are_refused_naming_the_field(llama_dir, change, error, field):
    config = ModelConfig.from_dir(llama_dir)
    table = TPRanks(TOPOLOGY.validate(config), config, clock=Clock())
    arguments = dict(shard_id="a") | change
    with pytest.raises(error) as caught:
        ask(table, config, **arguments)
    assert caught.value.field == field
    assert table.shards("stage-0") == []  # nothing recorded


def _configs(model_dir, router_port: int, **more) -> list[ServiceConfig]:
    base = ServiceConfig(model_dir=model_dir, topology=TOPOLOGY, router_address=f"127.0.0.1:{router_port}",
                         reregister_interval_s=0.5)
    return [dataclasses.replace(base, name="stage-0", tp_auto_rank=True, tp_shard_id="shard-a", **more),
            dataclasses.replace(base, name="stage-0", tp_auto_rank=True, tp_shard_id="shard-b", **more),
            dataclasses.replace(base, name="stage-1")]


def test_shards_without_ranks_form_their_group_through_the_router_and_a_restarted_router_adopts_them(llama_dir):
    prompt = [5, 17, 99, 3]
    expected = reference_greedy(llama_dir, prompt, 4)[0]

    router_config = ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY, port=free_port())
    address = f"127.0.0.1:{router_config.port}"

    async def ranks() -> list[tuple[int, str]]:
        async with grpc.aio.insecure_channel(address) as channel:
            status = await router_pb2_grpc.RouterStub(channel).GetClusterStatus(
                router_pb2.GetClusterStatusRequest(), timeout=10)
        stage0 = {s.name: s for s in status.servers}["stage-0"]
        assert all(s.seconds_since_heard < 60 for s in stage0.tp_shards)
        return sorted((s.rank, s.shard_id) for s in stage0.tp_shards)

    async def generate() -> list[int]:
        async with AsyncClient(address, timeout=120) as client:
            result = await client.generate_all(prompt, max_new_tokens=4, ignore_eos=True)
        return [t.token_id for t in result.tokens]

    async def main():
        router = await start_router(router_config)
        servers = []
        try:
            servers = list(await asyncio.gather(*(start_stage_server(c) for c in _configs(llama_dir, router.port))))
            names = sorted(s.servicer.name for s in servers)
            assert names == ["stage-0", "stage-0/tp1", "stage-1"]
            first = await generate()
            given = await ranks()
            assert given in ([(0, "shard-a"), (1, "shard-b")], [(0, "shard-b"), (1, "shard-a")])
            # A restarted router knows no ranks: the shards' next asks (every 0.5 s here) claim theirs.
            await router.stop(grace=None)
            router = await start_router(router_config)
            await grpc_util.wait_for_health(address, 60)  # rank 0 registered the stage again
            await wait_until(lambda: _equal(ranks(), given), timeout=30)
            return first, await generate()
        finally:
            for server in servers:
                await server.stop(grace=None)
            await router.stop(grace=None)

    assert asyncio.run(asyncio.wait_for(main(), 180)) == (expected, expected)


async def _equal(awaitable, value) -> bool:
    return await awaitable == value


def test_a_shard_whose_rank_0_does_not_come_is_not_serving_with_the_reason_until_it_comes(llama_dir):
    prompt = [5, 17, 99, 3]
    expected = reference_greedy(llama_dir, prompt, 4)[0]

    async def main():
        router = await start_router(ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY))
        base = _configs(llama_dir, router.port, tp_join_timeout=1.5)[2]
        config = dataclasses.replace(base, name="stage-0/tp1", tp_shard_id="lonely", tp_join_timeout=1.5)
        server, late = None, []
        try:
            started = time.monotonic()
            server = await start_stage_server(config)  # rank 1 by its name; rank 0 not started yet
            # The 1.5 s join timeout, not a hang; 30 s is room for a loaded machine (load average ~10).
            assert time.monotonic() - started < 30
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
                info = await stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=5)
                assert "rank 1: the router gave no rendezvous within 1.5 s" in info.not_serving_reason
            async with AsyncClient(f"127.0.0.1:{router.port}", timeout=10) as client:
                with pytest.raises(UnavailableError, match="stage-0"):
                    await client.generate_all([1, 2], max_new_tokens=1)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:  # bad input, over the wire
                bad = ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY, name="stage-0", tp_auto_rank=True,
                                    router_address="x:1", tp_shard_id="x")
                request = RouterRanks(bad, TOPOLOGY.stages[0], rank=7).request()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await router_pb2_grpc.RegistryStub(channel).RegisterServer(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert caught.value.details().startswith("tp_shard.rank: 7 is not in [0, 2)")
            # It keeps its rank and keeps waiting (stage_server/tp_membership.py): once a rank 0 comes,
            # the group forms and the stage serves transformers' tokens.
            await asyncio.sleep(1.2)
            [holder] = router.state.cluster.tp_ranks.shards("stage-0")
            assert (holder.rank, holder.shard_id) == (1, "lonely") and holder.seconds_since_heard < 1.0
            late = [await start_stage_server(dataclasses.replace(base, name="stage-0", tp_auto_rank=True,
                                                                  tp_shard_id="late", tp_join_timeout=60)),
                    await start_stage_server(base)]
            await grpc_util.wait_for_health(f"127.0.0.1:{router.port}", 60)
            async with AsyncClient(f"127.0.0.1:{router.port}", timeout=60) as client:
                result = await client.generate_all(prompt, max_new_tokens=4, ignore_eos=True)
            assert [t.token_id for t in result.tokens] == expected
        finally:
            for running in [server, *late]:
                if running is not None:
                    await running.stop(grace=None)
            await router.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_shard_may_not_claim_auto_rank_with_a_shard_name_or_a_rendezvous(llama_dir):
    with pytest.raises(ValueError, match="tp_auto_rank"):
        ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY, name="stage-0/tp1", tp_auto_rank=True,
                      router_address="127.0.0.1:1")
    with pytest.raises(ValueError, match="tp_auto_rank"):
        ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY, name="stage-1", tp_auto_rank=True,
                      router_address="127.0.0.1:1")
    with pytest.raises(ValueError, match="needs a tp_rendezvous"):
        ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY, name="stage-0")
    assert ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY, name="stage-0", tp_auto_rank=True,
                         router_address="127.0.0.1:1").tp_shard_id  # a default id


def test_shardmesh_status_shows_the_ranks_the_router_gave():
    from shardmesh.cli_status import render

    status = router_pb2.ClusterStatus(servers=[router_pb2.ServerStatus(
        name="stage-0", role=router_pb2.SERVER_ROLE_STAGE, address="h:1", registered=True,
        layers=router_pb2.LayerRange(start=0, end=2),
        tp_shards=[router_pb2.TensorParallelShardStatus(rank=0, shard_id="pod-a"),
                   router_pb2.TensorParallelShardStatus(rank=1, shard_id="pod-b")])])
    assert "layers [0, 2), rank 0: pod-a, rank 1: pod-b" in render(status)
