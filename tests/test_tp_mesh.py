"""Tensor-parallel stages in a mesh over real gRPC on loopback (in process): PP x TP = 2 x 2 with
concurrent requests == transformers; a shard that never joins leaves its stage NOT_SERVING with the
reason and its steps UNAVAILABLE, never a hang."""

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh_helpers import check_against_reference, generate_staggered, local_mesh
from test_mesh_features import cached_on_every_stage, wait_until
from shardmesh import codec
from shardmesh.service_config import ServiceConfig
from shardmesh.topology import ExpertServerSpec, StageSpec, Topology
from shardmesh.tp_group import free_port
from shardmesh.v1 import stage_pb2, stage_pb2_grpc
from stage_server.main import start_stage_server


def tp_topology(num_layers: int, tp: int, num_experts: int = 0) -> Topology:
    half = num_layers // 2
    experts = (ExpertServerSpec("experts-0", tuple((l, e) for l in range(num_layers) for e in range(num_experts))),)
    return Topology((StageSpec("stage-0", 0, half, tp), StageSpec("stage-1", half, num_layers, tp)),
                    experts if num_experts else ())


async def _all_empty(mesh) -> bool:
    return all(not ids for ids in await cached_on_every_stage(mesh))


@pytest.mark.parametrize("variant", ["mixtral", "llama"])
def test_pp2_tp2_mesh_matches_transformers(model_dirs, variant):
    model_dir = model_dirs[variant]
    num_experts = 8 if variant == "mixtral" else 0
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (6, 11, 3)]

    async def main():
        async with local_mesh(model_dir, tp_topology(4, 2, num_experts)) as mesh:
            assert [s.servicer.name for s in mesh.stages] == ["stage-0", "stage-0/tp1", "stage-1", "stage-1/tp1"]
            results = await generate_staggered(mesh.address, prompts, max_new_tokens=5)
            # FreeSequences reaches every shard (rank 0 fans it out), each over its own GetStageInfo.
            await wait_until(lambda: _all_empty(mesh), timeout=5.0)
            return results

    results = asyncio.run(asyncio.wait_for(main(), 180))
    check_against_reference(model_dir, prompts, results, 5, f"{variant} pp2 x tp2 mesh")


def test_a_shard_that_never_starts_leaves_the_stage_not_serving(llama_dir):
    topology = Topology((StageSpec("stage-0", 0, 4, 2),))
    config = ServiceConfig(model_dir=llama_dir, name="stage-0", topology=topology,
                           tp_rendezvous=f"127.0.0.1:{free_port()}", tp_join_timeout=1.5)

    async def main():
        started = time.monotonic()
        server = await start_stage_server(config)  # rank 1 ("stage-0/tp1") is never started
        try:
            assert time.monotonic() - started < 15
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
                request = stage_pb2.StepRequest(step_id=1, sequences=[stage_pb2.SequenceSlice(
                    sequence_id=1, start_position=0, num_tokens=2)], token_ids=codec.encode(torch.tensor([3, 4])))
                call = stage_pb2_grpc.StageStub(channel).Step(iter([request]), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in call:
                        pass
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "could not join the group" in caught.value.details()
                assert "stage stage-0 rank 0" in caught.value.details()
        finally:
            await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_topology_file_says_tp_per_stage(llama_dir):
    from shardmesh.config import ModelConfig

    config = ModelConfig.from_dir(llama_dir)
    topology = Topology.from_toml('[[stage]]\nname = "s0"\nlayers = [0, 2]\ntp = 2\n\n'
                                  '[[stage]]\nname = "s1"\nlayers = [2, 4]\n', 4).validate(config)
    assert [s.tp for s in topology.stages] == [2, 1] and topology.stages[0].shard_names() == ["s0", "s0/tp1"]
    assert topology.server("s0/tp1") is topology.stages[0]
    assert Topology.from_toml(topology.to_toml(), 4) == topology
    with pytest.raises(KeyError):
        topology.server("s1/tp1")
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by tp 3"):
        Topology((StageSpec("s0", 0, 4, 3),)).validate(config)
    with pytest.raises(ValueError, match="needs a tp_rendezvous"):
        ServiceConfig(model_dir=llama_dir, name="s0/tp1", topology=topology)

