"""A scaled expert service: several servers register as one topology entry ("experts-a") with
distinct replica ids; the router lists every replica's address in the placement it pushes to
the stages (a bumped version), the replicas share the load, and the tokens stay exact."""

import asyncio

import grpc
import pytest

from shardmesh.client import AsyncClient
from shardmesh.service_config import ServiceConfig
from shardmesh.v1 import router_pb2, router_pb2_grpc

from mesh_helpers import local_mesh
from oracle import assert_greedy_matches, reference_greedy

PROMPTS = [[1, 9, 27, 81], [5, 7, 11, 13, 17], [2, 200, 31], [100, 50, 25, 12, 6, 3]]
NEW_TOKENS = 6


async def start_replica(model_dir, router_address: str, replica_id: str):
    from expert_server.main import start_expert_server
    return await start_expert_server(ServiceConfig(model_dir=model_dir, name="experts-a", router_address=router_address,
                                                   replica_id=replica_id))


async def generate_all(address: str) -> list[tuple[list[int], list]]:
    import torch

    async with AsyncClient(address, timeout=60) as client:
        async def one(prompt):
            tokens, logits = [], []
            async for token in client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, return_logits=True):
                tokens.append(token.token_id)
                logits.append(torch.tensor(token.logits))
            return tokens, logits
        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


def check_exact(model_dir, results, context: str) -> None:
    for i, (prompt, (tokens, logits)) in enumerate(zip(PROMPTS, results, strict=True)):
        ref_tokens, ref_logits = reference_greedy(model_dir, prompt, NEW_TOKENS)
        assert_greedy_matches(tokens, logits, ref_tokens, ref_logits, context=f"{context} prompt {i}")


def experts_a_status(status: router_pb2.ClusterStatus) -> router_pb2.ServerStatus:
    return next(s for s in status.servers if s.name == "experts-a")


def test_replicas_of_one_expert_server_are_all_placed_and_share_the_load(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir) as mesh:
            first = next(e for e in mesh.experts if e.servicer.name == "experts-a")
            cluster = mesh.router.state.cluster
            version_before = cluster.placement_version
            replicas = [await start_replica(mixtral_dir, mesh.address, "replica-2")]
            try:
                addresses = [first.address, replicas[0].address]
                async with AsyncClient(mesh.address, timeout=10) as client:
                    status = await client.cluster_status()
                assert list(experts_a_status(status).replica_addresses) == addresses
                assert status.placement_version == version_before + 1
                for stage in mesh.stages:  # the new placement reached every stage before any step used it
                    placement = stage.servicer.experts.placement
                    assert placement.version == status.placement_version
                    for expert in range(5):  # experts-a holds experts 0..4 of every layer
                        assert set(addresses) <= set(placement.replicas[(0, expert)])
                    assert first.address not in placement.replicas[(0, 6)]  # experts-b's alone

                results = await generate_all(mesh.address)
                check_exact(mixtral_dir, results, "two replicas of experts-a")
                assert first.servicer.tokens_computed > 0 and replicas[0].servicer.tokens_computed > 0

                # Scaling up while serving: a third replica registers and takes load too.
                replicas.append(await start_replica(mixtral_dir, mesh.address, "replica-3"))
                assert len(cluster.servers["experts-a"].addresses) == 3
                assert mesh.stages[0].servicer.experts.placement.version == version_before + 2
                results = await generate_all(mesh.address)
                check_exact(mixtral_dir, results, "three replicas of experts-a")
                assert replicas[1].servicer.tokens_computed > 0
            finally:
                for replica in replicas:
                    await replica.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_replica_rules_over_the_wire(mixtral_dir):
    """Same id again replaces that replica; another id at a known address replaces the old
    holder; a stage cannot have replicas; an overlong id is refused; the router keeps serving."""

    async def main():
        async with local_mesh(mixtral_dir) as mesh:
            cluster = mesh.router.state.cluster
            held = cluster.servers["experts-a"].spec.experts
            expert_keys = [router_pb2.ExpertKey(layer=layer, expert=expert) for layer, expert in held]
            fingerprint = cluster.config.fingerprint

            def expert(replica_id: str, address: str) -> router_pb2.RegisterServerRequest:
                return router_pb2.RegisterServerRequest(name="experts-a", role=router_pb2.SERVER_ROLE_EXPERT,
                                                        address=address, experts=expert_keys, replica_id=replica_id,
                                                        model_fingerprint=fingerprint)

            first = cluster.servers["experts-a"].address
            # Unreachable test addresses: the stages never get a step that picks them.
            async with grpc.aio.insecure_channel(mesh.address) as channel:
                registry = router_pb2_grpc.RegistryStub(channel)
                await registry.RegisterServer(expert("x", "127.0.0.1:9"), timeout=10)
                await registry.RegisterServer(expert("x", "127.0.0.1:7"), timeout=10)  # same id: moved
                assert cluster.servers["experts-a"].addresses == [first, "127.0.0.1:7"]
                await registry.RegisterServer(expert("y", "127.0.0.1:7"), timeout=10)  # x restarted as y
                assert cluster.servers["experts-a"].replicas == {"": first, "y": "127.0.0.1:7"}

                stage = cluster.servers["stage-0"].spec
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await registry.RegisterServer(router_pb2.RegisterServerRequest(
                        name="stage-0", role=router_pb2.SERVER_ROLE_STAGE, address="127.0.0.1:5", replica_id="s",
                        layers=router_pb2.LayerRange(start=stage.start_layer, end=stage.end_layer),
                        model_fingerprint=fingerprint), timeout=10)
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "replica_id" in refused.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await registry.RegisterServer(expert("z" * 254, "127.0.0.1:6"), timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "replica_id" in refused.value.details()
                assert cluster.servers["stage-0"].addresses == [mesh.stages[0].address]
                assert cluster.servers["experts-a"].replicas == {"": first, "y": "127.0.0.1:7"}
            async with AsyncClient(mesh.address, timeout=10) as client:
                status = await client.cluster_status()
            assert status.serving and list(experts_a_status(status).replica_addresses) == [first, "127.0.0.1:7"]

    asyncio.run(asyncio.wait_for(main(), 60))


def test_service_config_replica_id_only_for_expert_servers(mixtral_dir):
    assert ServiceConfig(model_dir=mixtral_dir, name="experts-b", replica_id="r1").replica_id == "r1"
    with pytest.raises(ValueError, match="only expert servers and stages with standbys have replicas"):
        ServiceConfig(model_dir=mixtral_dir, name="stage-0", replica_id="r1")
