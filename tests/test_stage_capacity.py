"""A stage's KV capacity (`--max-cached-sequences`): a step that would start one sequence more than
the cache may hold is refused with RESOURCE_EXHAUSTED naming that sequence, changes nothing, and a
step of cached sequences goes on; once one is freed a new one fits. Also through the command line.
Over the wire (stage_server/capacity.py, StepResponse.refused): only the sequence that does not
fit fails, with RESOURCE_EXHAUSTED to its client; the sequences stepped with it go on with
transformers' tokens."""

import asyncio

import grpc
import pytest
import torch

from shardmesh.reference import transformers_greedy
from shardmesh.v1 import router_pb2, router_pb2_grpc

from mesh_helpers import local_mesh
from stage_server.capacity import split_over_capacity

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.errors import ResourceExhausted
from shardmesh.serve import add_service_arguments
from shardmesh.stage_model import StageBatch, StageModel
from shardmesh.topology import StageSpec, Topology


def step(stage: StageModel, sequence_ids, start_positions, num_tokens):
    token_ids = torch.arange(1, 1 + sum(num_tokens), dtype=torch.long)  # [N]
    return asyncio.run(stage.forward(StageBatch(list(sequence_ids), list(start_positions), list(num_tokens),
                                                token_ids), None))


def test_a_new_sequence_past_the_capacity_is_refused(llama_dir):
    config = ModelConfig.from_dir(llama_dir)
    stage = StageModel(config, 0, config.num_layers, CheckpointReader(llama_dir))
    stage.max_cached_sequences = 2
    step(stage, [1, 2], [0, 0], [3, 2])
    with pytest.raises(ResourceExhausted) as refused:
        step(stage, [1, 3], [3, 0], [1, 2])  # one cached, one new: the new one does not fit
    assert refused.value.field == "sequences[1].sequence_id", refused.value
    assert "--max-cached-sequences" in refused.value.message
    assert stage.cached_sequence_ids() == [1, 2] and stage.cached_length(1) == 3  # nothing changed
    step(stage, [1, 2], [3, 2], [1, 1])  # cached sequences go on
    stage.free([2])
    step(stage, [1, 3], [4, 0], [1, 2])  # room again
    assert stage.cached_sequence_ids() == [1, 3]


def test_the_stage_command_line_takes_the_capacity():
    import argparse
    parser = argparse.ArgumentParser()
    add_service_arguments(parser, "stage")
    args = parser.parse_args(["--model", "m", "--name", "s0", "--router", "r:1", "--max-cached-sequences", "8"])
    assert args.max_cached_sequences == 8


def test_a_step_is_split_around_the_sequences_that_do_not_fit(llama_dir):
    config = ModelConfig.from_dir(llama_dir)
    stage = StageModel(config, 0, config.num_layers, CheckpointReader(llama_dir))
    stage.max_cached_sequences = 2
    step(stage, [1], [0], [3])
    batch = StageBatch([1, 2, 3, 4], [3, 0, 0, 0], [1, 2, 3, 1], torch.tensor([10, 20, 21, 30, 31, 32, 40]),
                       greedy=True)
    kept, refused = split_over_capacity(stage, batch)
    assert kept.sequence_ids == [1, 2] and kept.num_tokens == [1, 2] and kept.inputs.tolist() == [10, 20, 21]
    assert kept.greedy  # the kept sequences still want greedy tokens only (the greedy head may serve them)
    assert [(r.index, r.code, r.field) for r in refused] == [(2, "RESOURCE_EXHAUSTED", "sequences[2].sequence_id"),
                                                             (3, "RESOURCE_EXHAUSTED", "sequences[3].sequence_id")]
    assert "--max-cached-sequences" in refused[0].message
    step(stage, [2], [0], [1])  # full now: a step of new sequences only is refused whole
    kept, refused = split_over_capacity(stage, StageBatch([5, 6], [0, 0], [1, 1], torch.tensor([1, 2])))
    assert kept is None and [r.index for r in refused] == [0, 1]
    malformed = StageBatch([5, 6], [0, 0], [1, 1], torch.tensor([1, 2, 3]))  # 3 tokens for 2: validate names it
    assert split_over_capacity(stage, malformed) == (malformed, [])


@pytest.mark.parametrize("second_stage_tp", [1, 2])
def test_only_the_sequence_past_a_stage_capacity_fails(llama_dir, second_stage_tp):
    """A and B run on two stages; C joins their batch while the second stage's cache holds only 2
    sequences: C gets RESOURCE_EXHAUSTED naming that stage's field (the first stage had cached it,
    and frees it), A and B finish with transformers' tokens, and D fits once they are done. With
    the second stage tensor-parallel (2 shards, gloo in process) its rank 0 refuses C and forwards
    the rest: both shards run the same step."""
    prompts = {"A": [1, 5, 9], "B": [1, 7, 11, 13], "C": [1, 3], "D": [1, 17, 19]}
    new_tokens = {"A": 24, "B": 24, "C": 4, "D": 6}

    async def body():
        stages = Topology((StageSpec("stage-0", 0, 2), StageSpec("stage-1", 2, 4, second_stage_tp)))
        async with local_mesh(llama_dir, stages, router_options=dict(max_batch_sequences=4, micro_batches=1)) as mesh:
            second = [s.servicer.model for s in mesh.stages if s.servicer.name.startswith("stage-1")]
            assert len(second) == second_stage_tp
            for model in second:
                model.max_cached_sequences = 2
            first_stage = mesh.stages[0].servicer.model
            async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.router.port}") as channel:
                stub = router_pb2_grpc.RouterStub(channel)

                def generate(name):
                    return stub.Generate(router_pb2.GenerateRequest(
                        prompt_token_ids=prompts[name], max_new_tokens=new_tokens[name], ignore_eos=True), timeout=120)

                running = {name: generate(name) for name in "AB"}
                tokens = {name: [(await call.read()).token_id] for name, call in running.items()}  # both cached
                try:
                    c_tokens = [r.token_id async for r in generate("C")]
                    c_outcome = (grpc.StatusCode.OK, c_tokens)
                except grpc.aio.AioRpcError as error:
                    c_outcome = (error.code(), error.details())
                for name, call in running.items():
                    while (response := await call.read()) is not grpc.aio.EOF:
                        tokens[name].append(response.token_id)
                for _ in range(500):  # the router frees C, then A and B, on every stage (bounded wait)
                    if not first_stage.cached_sequence_ids() and not any(m.cached_sequence_ids() for m in second):
                        break
                    await asyncio.sleep(0.01)
                cached_after = first_stage.cached_sequence_ids()
                assert all(model.cached_sequence_ids() == [] for model in second)  # every shard freed them
                tokens["D"] = [r.token_id async for r in generate("D")]
        return c_outcome, tokens, cached_after

    c_outcome, tokens, cached_after = asyncio.run(body())
    code, details = c_outcome
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, c_outcome
    assert details.startswith("stage: stage stage-1 refused this sequence: sequences[") and \
        "--max-cached-sequences" in details, details
    for name in "ABD":
        assert tokens[name] == transformers_greedy(llama_dir, prompts[name], new_tokens[name], ignore_eos=True), name
    assert cached_after == []
