"""A tensor-parallel group that re-forms (router/tp_ranks.py generations, stage_server/tp_membership.py).

The router's rank table on a fake clock: a shard of the current generation starting again, or
one reporting its group lost, starts the next generation (once), clears the rendezvous, and only
rank 0's store for the new generation is taken. Then an in-process mesh: rank 1's server stops mid-generation
and a new one starts with the same shard id: the group re-forms, the running generation replays on
it and ends with transformers' tokens, and so do new requests. The real-process version (SIGKILL) is tests/test_tp_reform_processes.py."""

import asyncio
import dataclasses
import time

import pytest
import torch

from mesh_helpers import generate_staggered, local_mesh
from mesh_helpers import topology as mesh_topology
from oracle import assert_greedy_matches, reference_greedy
from router.main import start_router
from router.tp_ranks import TPRanks
from shardmesh import grpc_util
from shardmesh.config import ModelConfig
from shardmesh.client import AsyncClient
from shardmesh.errors import InvalidArgument
from shardmesh.service_config import ServiceConfig
from stage_server.main import start_stage_server
from test_mesh_features import wait_until
from test_tp_ranks import TOPOLOGY, Clock, ask

def test_a_restarted_or_lost_rank_starts_one_new_generation_and_only_its_store_is_taken(llama_dir):
    config, clock = ModelConfig.from_dir(llama_dir), Clock()
    table = TPRanks(TOPOLOGY.validate(config), config, lease_s=30, clock=clock)
    # Generation 1 forms: both start, rank 0 gives its store, both say they are in it.
    assert (ask(table, config, "a", starting=True).generation, ask(table, config, "b", starting=True).rank) == (1, 1)
    assert ask(table, config, "b", rank=1).rendezvous == ""  # not given yet: b asks again
    assert ask(table, config, "a", rank=0, rendezvous="h:1", generation=1).rendezvous == "h:1"
    assert (ask(table, config, "b", rank=1, generation=1).rendezvous, table.generation["stage-0"]) == ("h:1", 1)

    # b restarts (same id, rank 1 back): generation 2, no rendezvous until rank 0 gives one for it.
    restarted = ask(table, config, "b", starting=True)
    assert (restarted.rank, restarted.generation, restarted.rendezvous) == (1, 2, "")
    heartbeat = ask(table, config, "a", rank=0, rendezvous="h:1", generation=1)  # a's old store: ignored
    assert (heartbeat.generation, heartbeat.rendezvous) == (2, "")
    assert ask(table, config, "a", rank=0, rendezvous="h:2", generation=2).rendezvous == "h:2"
    assert ask(table, config, "b", rank=1).rendezvous == "h:2"
    ask(table, config, "b", rank=1, generation=2)
    assert [s.generation for s in table.shards("stage-0")] == [2, 2]

    # Both see the group break and say so: one new generation, not two.
    assert ask(table, config, "a", rank=0, generation=2, lost=True).generation == 3
    assert ask(table, config, "b", rank=1, generation=2, lost=True).generation == 3
    assert ask(table, config, "a", rank=0, rendezvous="h:3", generation=3).rendezvous == "h:3"
    ask(table, config, "b", rank=1, generation=3)

    # Rank 0 restarts: its store is gone with it.
    assert (ask(table, config, "a", starting=True).generation, table.rendezvous.get("stage-0")) == (4, None)
    ask(table, config, "a", rank=0, rendezvous="h:4", generation=4)
    # A shard starting before the group formed (never in one) changes nothing.
    assert ask(table, config, "b", starting=True).generation == 4

    # b is in generation 4 and dies; after its lease another shard takes rank 1: generation 5.
    ask(table, config, "b", rank=1, generation=4)
    clock.now += 20
    ask(table, config, "a", rank=0, rendezvous="h:4", generation=4)
    clock.now += 15
    taken = ask(table, config, "c", starting=True)
    assert (taken.rank, taken.generation, taken.rendezvous) == (1, 5, "")

    # A router that restarted adopts the generation its shards are in, and rank 0's store for it.
    fresh = TPRanks(TOPOLOGY.validate(config), config, lease_s=30, clock=clock)
    assert ask(fresh, config, "c", rank=1, generation=5).generation == 5
    assert ask(fresh, config, "a", rank=0, rendezvous="h:5", generation=5).rendezvous == "h:5"
    with pytest.raises(InvalidArgument) as caught:
        ask(fresh, config, "a", rank=0, generation=2**62)
    assert caught.value.field == "tp_shard.generation"


def test_an_in_process_shard_replaced_under_its_id_re_forms_the_group_and_serves_the_reference(llama_dir):
    prompts, max_new_tokens = [[5, 17, 99, 3], [8, 1, 4]], 4
    router_config = ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY)

    async def main():
        router = await start_router(router_config)
        address = f"127.0.0.1:{router.port}"
        base = ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY, router_address=address, tp_join_timeout=60)
        shard = {i: dataclasses.replace(base, name="stage-0", tp_auto_rank=True, tp_shard_id=f"shard-{i}")
                 for i in (0, 1)}
        servers = {}
        try:
            for key, config in [("0", shard[0]), ("1", shard[1]), ("last", dataclasses.replace(base, name="stage-1"))]:
                servers[key] = asyncio.create_task(start_stage_server(config))
            servers = {key: await task for key, task in servers.items()}
            await grpc_util.wait_for_health(address, 60)
            before = await generate_staggered(address, prompts, max_new_tokens)
            rank1 = next(key for key in ("0", "1") if servers[key].servicer.name == "stage-0/tp1")
            rank0 = servers["1" if rank1 == "0" else "0"]
            replaced = asyncio.Event()
            started = 0.0

            async def replace_rank1() -> None:  # once the long generation below is under way
                nonlocal started
                await servers[rank1].stop(grace=None)  # its process gone, as far as the group can tell
                started = time.monotonic()
                servers[rank1] = await start_stage_server(shard[int(rank1)])  # the same shard id: rank 1 again
                replaced.set()

            async with AsyncClient(address, timeout=120) as client:  # in flight across the re-form
                in_flight, logits = [], []
                async for token in client.generate(prompts[0], max_new_tokens=16, ignore_eos=True, return_logits=True):
                    in_flight.append(token.token_id)
                    logits.append(torch.tensor(token.logits))
                    if len(in_flight) == 2:
                        replacing = asyncio.create_task(replace_rank1())
                await replacing
            assert router.state.pipeline.epoch == 1  # the generation was replayed once, on the re-formed group
            table = router.state.cluster.tp_ranks
            await wait_until(lambda: _true(rank0.servicer.tp_fanout is not None and table.generation["stage-0"] > 1
                                           and not rank0.servicer.not_serving_reason), timeout=60)
            reformed_s = time.monotonic() - started
            await grpc_util.wait_for_health(address, 60)
            after = await generate_staggered(address, prompts, max_new_tokens)
            return before, (in_flight, logits), after, reformed_s, table.generation["stage-0"]
        finally:
            for server in (servers.values() if isinstance(servers, dict) else ()):
                if not isinstance(server, asyncio.Task):
                    await server.stop(grace=None)
            await router.stop(grace=None)

    before, in_flight, after, reformed_s, generation = asyncio.run(asyncio.wait_for(main(), 240))
    for results in (before, after):
        for prompt, (tokens, logits) in zip(prompts, results):
            assert_greedy_matches(tokens, logits, *reference_greedy(llama_dir, prompt, max_new_tokens))
    # Replayed on the re-formed group (router/failover.py waited for it): transformers' tokens throughout.
    assert_greedy_matches(*in_flight, *reference_greedy(llama_dir, prompts[0], 16), context="in flight")
    assert generation == 2
    assert reformed_s < 60  # ~1-2 s idle (the 1 s ask interval, the join); 60 s: load ~10


async def _true(value) -> bool:
    return bool(value)


def test_a_moe_tp_stage_of_a_local_mesh_re_forms_and_gives_the_restarted_shard_its_placement(mixtral_dir):
    """local_mesh starts TP shards with auto ranks; a replaced rank 1 has no expert placement until
    rank 0 gives it the one it holds (no new placement version is pushed by the router here)."""
    base = mesh_topology([(0, 2), (2, 4)], [[0, 1, 2, 3], [4, 5, 6, 7]])
    topology = dataclasses.replace(base, stages=(dataclasses.replace(base.stages[0], tp=2), base.stages[1]))
    prompts, max_new_tokens = [[1, 5, 9, 13], [2, 8]], 4

    async def main():
        async with local_mesh(mixtral_dir, topology) as mesh:
            before = await generate_staggered(mesh.address, prompts, max_new_tokens)
            assert [s.servicer.name for s in mesh.stages] == ["stage-0", "stage-0/tp1", "stage-1"]
            shard_id = next(s.shard_id for s in mesh.router.state.cluster.tp_ranks.shards("stage-0") if s.rank == 1)
            await mesh.stages[1].stop(grace=None)
            version = mesh.router.state.cluster.placement_version
            mesh.stages[1] = await start_stage_server(ServiceConfig(
                model_dir=mixtral_dir, topology=topology, router_address=mesh.address, name="stage-0",
                tp_auto_rank=True, tp_shard_id=shard_id))
            rank0 = mesh.stages[0].servicer
            await wait_until(lambda: _true(mesh.stages[1].servicer.placement_ready.is_set()
                                           and rank0.tp_fanout is not None and not rank0.not_serving_reason), 60)
            await grpc_util.wait_for_health(mesh.address, 60)
            after = await generate_staggered(mesh.address, prompts, max_new_tokens)
            assert mesh.router.state.cluster.placement_version == version  # rank 0 gave it, not the router
            return before, after

    before, after = asyncio.run(asyncio.wait_for(main(), 240))
    for results in (before, after):
        for prompt, (tokens, logits) in zip(prompts, results):
            assert_greedy_matches(tokens, logits, *reference_greedy(mixtral_dir, prompt, max_new_tokens))


def test_a_join_in_progress_is_given_up_for_a_newer_generation(llama_dir):
    """Rank 0 waits in its join for a rank 1 that got the rendezvous; that peer reports the
    generation lost (as a restarted or failing one would): rank 0 leaves the join at once and opens
    a store for the next generation, rather than waiting out its 300 s join timeout."""
    async def main():
        router = await start_router(ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY))
        address = f"127.0.0.1:{router.port}"
        table = router.state.cluster.tp_ranks
        config = ServiceConfig(model_dir=llama_dir, topology=TOPOLOGY, router_address=address, name="stage-0",
                               tp_auto_rank=True, tp_shard_id="alone", tp_join_timeout=300)
        starting = asyncio.create_task(start_stage_server(config))
        server = None
        try:
            await wait_until(lambda: _true(table.rendezvous.get("stage-0")), timeout=60)  # rank 0 joins, waiting
            assert ask(table, config.model, "ghost", starting=True).rank == 1
            assert ask(table, config.model, "ghost", rank=1).generation == 1
            given_up = time.monotonic()
            assert ask(table, config.model, "ghost", rank=1, generation=1, lost=True).generation == 2
            await wait_until(lambda: _true(table.rendezvous.get("stage-0") and table.holders["stage-0"][0].generation == 2),
                             timeout=60)
            waited_s = time.monotonic() - given_up
            server = await asyncio.wait_for(starting, 30)  # its first attempt ended: NOT_SERVING with why
            assert "generation 1 was superseded by a newer one" in server.servicer.not_serving_reason
            return waited_s
        finally:
            if server is None:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            else:
                await server.stop(grace=None)
            await router.stop(grace=None)

    waited_s = asyncio.run(asyncio.wait_for(main(), 180))
    assert waited_s < 30  # ~1 s (its next ask); 30 s: load ~10, and far below the 300 s join timeout
