"""A step whose expert calls fail on one rank of a tensor-parallel stage fails on every rank, at the
same collective (models.parallel.moe_block, tp_group.all_reduce_agreeing): no rank keeps the step's
KV, every rank ran the same collectives, and the next step works. First two gloo ranks of one
StageModel each (real collectives), then a PP x TP = 2 x 2 mesh over real gRPC on loopback with
one shard's experts failing once: that request fails UNAVAILABLE, the stage stays SERVING, the
next requests match transformers."""

import asyncio

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh_helpers import check_against_reference, generate_staggered, local_mesh
from oracle import reference_greedy
from shardmesh.checkpoint import CheckpointReader
from shardmesh.client import AsyncClient, UnavailableError
from shardmesh.config import ModelConfig
from shardmesh.errors import Unavailable
from shardmesh.stage_model import StageBatch, StageModel
from shardmesh.tp_group import TPStepFailed
from shardmesh.tp_stage import forward_off_loop
from shardmesh.v1 import stage_pb2, stage_pb2_grpc
from test_model_local import every_layer, load_experts
from test_tp_mesh import tp_topology
from test_tp_stage import form_groups


class FailOnce:
    """An ExpertBackend that fails its first call for `layer` (then works), as an expert server
    that dropped one call would."""

    def __init__(self, inner, layer: int):
        self.inner, self.layer, self.failures = inner, layer, 0

    async def run(self, layer, groups):
        if layer == self.layer and not self.failures:
            self.failures += 1
            raise Unavailable("experts", f"injected: this rank's expert call for layer {layer} failed")
        return await self.inner.run(layer, groups)

    async def close(self) -> None:  # the stage closes its backend when it stops
        await self.inner.close()


def test_an_expert_failure_on_one_rank_fails_the_step_on_both_and_the_next_step_works(mixtral_dir):
    config = ModelConfig.from_dir(mixtral_dir)
    experts = load_experts(mixtral_dir, [every_layer(config, range(config.num_experts))])
    prompt = [5, 17, 99, 3, 42, 8]
    batch = StageBatch([1], [0], [len(prompt)], torch.tensor(prompt))

    async def main():
        groups = await form_groups(2)
        ranks = [StageModel(config, 0, 4, CheckpointReader(mixtral_dir), tp=g) for g in groups]
        flaky = FailOnce(experts, layer=2)  # rank 1 only, a middle layer: collectives before and after it
        first = await asyncio.gather(forward_off_loop(ranks[0], batch, experts),
                                     forward_off_loop(ranks[1], batch, flaky), return_exceptions=True)
        assert [type(e) for e in first] == [TPStepFailed, TPStepFailed], first
        assert all("rank(s) [1]" in e.message and TPStepFailed.MARKER in e.message for e in first)
        assert "injected" in first[1].message and first[0].field == "experts"
        assert [r.cached_sequence_ids() for r in ranks] == [[], []]  # no rank kept the step's KV
        again = await asyncio.gather(forward_off_loop(ranks[0], batch, experts),
                                     forward_off_loop(ranks[1], batch, flaky))
        assert torch.equal(again[0], again[1])
        assert [r.cached_length(1) for r in ranks] == [len(prompt)] * 2
        return again[0]

    logits = asyncio.run(asyncio.wait_for(main(), 120))  # [1, V]
    tokens, step_logits = reference_greedy(mixtral_dir, prompt, 1)
    assert int(logits[0].argmax()) == tokens[0]
    torch.testing.assert_close(logits[0], step_logits[0], rtol=0, atol=1e-4 * float(step_logits[0].abs().max()))


def test_a_mesh_whose_shard_fails_one_expert_call_fails_that_request_and_serves_the_next(mixtral_dir):
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (7, 4)]

    async def main():
        async with local_mesh(mixtral_dir, tp_topology(4, 2, 8)) as mesh:
            shard = next(s for s in mesh.stages if s.servicer.name == "stage-1/tp1")
            shard.servicer.backend = FailOnce(shard.servicer.backend, layer=3)
            async with AsyncClient(mesh.address, timeout=120) as client:
                with pytest.raises(UnavailableError, match="failed on every rank"):
                    await client.generate_all([9, 8, 7], max_new_tokens=3, ignore_eos=True)
            assert shard.servicer.backend.failures == 1
            for stage in mesh.stages:  # the group did not break: every shard SERVING, nothing to report
                async with grpc.aio.insecure_channel(f"127.0.0.1:{stage.port}") as channel:
                    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    info = await stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=5)
                assert (health.status, info.not_serving_reason) == (health_pb2.HealthCheckResponse.SERVING, ""), \
                    (stage.servicer.name, info.not_serving_reason)
            return await generate_staggered(mesh.address, prompts, max_new_tokens=4)

    results = asyncio.run(asyncio.wait_for(main(), 180))
    check_against_reference(mixtral_dir, prompts, results, 4, "mixtral pp2 x tp2 after an agreed step failure")
