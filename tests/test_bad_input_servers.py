"""Bad input sent straight to stage and expert servers over the real wire (as a buggy or hostile
router or stage would): each gets a precise status naming the field, the server keeps serving, and
other sequences' KV cache is untouched, even for a generation in flight across the bad input."""

import grpc
import pytest
import torch

from bad_input_harness import (BAD_SEQUENCE_ID, FAILED, HIDDEN, INVALID, LONG_NEW_TOKENS, LONG_PROMPT, MAX_POSITIONS,
                               NOT_FOUND, TOPOLOGY, VOCAB, assert_status, call_error, compute_experts, generate_request,
                               harness, hidden_states, step_error, tensor, tiny_moe_model)  # noqa: F401  (fixtures)
from shardmesh import codec, grpc_util
from shardmesh.service_config import ServiceConfig
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2_grpc, stage_pb2, stage_pb2_grpc, tensor_pb2

from expert_server.main import start_expert_server

SEQ = BAD_SEQUENCE_ID


def step(sequences, token_ids=None, hidden=None) -> stage_pb2.StepRequest:
    """sequences: (sequence_id, start_position, num_tokens) each."""
    request = stage_pb2.StepRequest(step_id=1, sequences=[
        stage_pb2.SequenceSlice(sequence_id=i, start_position=s, num_tokens=n) for i, s, n in sequences])
    if token_ids is not None:
        request.token_ids.CopyFrom(token_ids)
    if hidden is not None:
        request.hidden_states.CopyFrom(hidden)
    return request


def ids(values) -> tensor_pb2.Tensor:
    return tensor(values, torch.int64)


def truncated(message: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=message.dtype, shape=message.shape, data=message.data[:-1])


# (stage index, StepRequest, expected code, field named in the details)
BAD_STEPS = {
    "token_ids_byte_length": (0, step([(SEQ, 0, 3)], truncated(ids([5, 6, 7]))), INVALID, "token_ids.data"),
    "hidden_states_byte_length": (1, step([(SEQ, 0, 3)], hidden=truncated(hidden_states(3))),
                                  INVALID, "hidden_states.data"),
    "unknown_dtype": (1, step([(SEQ, 0, 1)], hidden=tensor_pb2.Tensor(dtype=99, shape=[1, HIDDEN], data=bytes(4 * HIDDEN))),
                      INVALID, "hidden_states.dtype"),
    "unspecified_dtype": (0, step([(SEQ, 0, 1)], tensor_pb2.Tensor(shape=[1], data=bytes(8))), INVALID, "token_ids.dtype"),
    "negative_dimension": (1, step([(SEQ, 0, 1)], hidden=tensor_pb2.Tensor(dtype=1, shape=[-1, HIDDEN])),
                           INVALID, "hidden_states.shape"),
    "overflowing_empty_shape": (1, step([(SEQ, 0, 1)], hidden=tensor_pb2.Tensor(dtype=1, shape=[2**32, 2**32, 0])),
                                INVALID, "hidden_states.shape"),
    "empty_sequences": (0, step([], ids([5])), INVALID, "sequences"),
    "token_ids_to_non_first_stage": (1, step([(SEQ, 0, 2)], ids([5, 6])), INVALID, "hidden_states"),
    "hidden_states_to_first_stage": (0, step([(SEQ, 0, 2)], hidden=hidden_states(2)), INVALID, "token_ids"),
    "hidden_states_wrong_width": (1, step([(SEQ, 0, 2)], hidden=hidden_states(2, HIDDEN // 2)), INVALID, "hidden_states"),
    "hidden_states_wrong_dtype": (1, step([(SEQ, 0, 2)], hidden=hidden_states(2, dtype=torch.float16)),
                                  INVALID, "hidden_states"),
    "hidden_states_wrong_count": (1, step([(SEQ, 0, 3)], hidden=hidden_states(2)), INVALID, "hidden_states"),
    "token_id_negative": (0, step([(SEQ, 0, 3)], ids([5, -1, 6])), INVALID, "token_ids"),
    "token_id_at_vocab": (0, step([(SEQ, 0, 3)], ids([5, VOCAB, 6])), INVALID, "token_ids"),
    "token_ids_float": (0, step([(SEQ, 0, 2)], tensor([5.0, 6.0])), INVALID, "token_ids"),
    "token_ids_wrong_count": (0, step([(SEQ, 0, 3)], ids([5, 6])), INVALID, "token_ids"),
    "zero_num_tokens": (0, step([(SEQ, 0, 0), (SEQ + 1, 0, 1)], ids([5])), INVALID, "sequences[0].num_tokens"),
    "past_max_positions": (0, step([(SEQ, 0, MAX_POSITIONS + 1)], ids([5] * (MAX_POSITIONS + 1))),
                           INVALID, "sequences[0].num_tokens"),
    "unknown_sequence": (0, step([(SEQ, 0, 1), (SEQ + 1, 4, 1)], ids([5, 6])), NOT_FOUND, "sequences[1].sequence_id"),
    "duplicate_sequence_ids": (0, step([(SEQ, 0, 1), (SEQ + 1, 0, 1), (SEQ, 0, 1)], ids([5, 6, 7])),
                               INVALID, "sequences"),
}


@pytest.mark.parametrize("case", BAD_STEPS)
def test_step_refuses(harness, case):
    stage, request, code, field = BAD_STEPS[case]

    async def body():
        assert_status(await step_error(harness.stage(stage), request), code, field)
        await harness.expect_serving()

    harness.run(body())


def test_step_wrong_start_position_of_known_sequence(harness):
    async def body():
        async with grpc_util.insecure_channel(harness.stage(0)) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            responses = [r async for r in stub.Step(iter([step([(SEQ, 0, 3)], ids([5, 6, 7]))]), timeout=10)]
            assert [list(r.hidden_states.shape) for r in responses] == [[3, HIDDEN]]
            for start in (0, 2, 4):
                error = await call_error(stub.Step(iter([step([(SEQ, start, 1)], ids([8]))]), timeout=10))
                assert_status(error, FAILED, "sequences[0].start_position")
            freed = await stub.FreeSequences(stage_pb2.FreeSequencesRequest(sequence_ids=[SEQ]), timeout=10)
            assert freed.freed == 1  # still cached after the refusals
        await harness.expect_serving()

    harness.run(body())


def test_bad_steps_leave_a_generation_in_flight_untouched(harness):
    """Bad steps naming the live sequence (or batched with it) arrive between its steps; its tokens do not change."""
    async def body():
        async with grpc_util.insecure_channel(harness.mesh.address) as router_channel, \
                grpc_util.insecure_channel(harness.stage(0)) as channel_0, \
                grpc_util.insecure_channel(harness.stage(1)) as channel_1:
            call = router_pb2_grpc.RouterStub(router_channel).Generate(
                generate_request(LONG_PROMPT, LONG_NEW_TOKENS), timeout=30)
            tokens = [(await call.read()).token_id for _ in range(3)]
            stages = [stage_pb2_grpc.StageStub(channel_0), stage_pb2_grpc.StageStub(channel_1)]
            info = await stages[0].GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
            live = max(info.cached_sequence_ids)
            bad = [  # (stage, request, code, field)
                (0, step([(live, 0, 1)], ids([5])), FAILED, "sequences[0].start_position"),
                (1, step([(live, 0, 1)], hidden=hidden_states(1)), FAILED, "sequences[0].start_position"),
                (0, step([(SEQ, 0, 1), (live, 0, 1)], ids([5, 6])), FAILED, "sequences[1].start_position"),
                (0, step([(SEQ, 0, 1), (SEQ, 0, 1), (live, 0, 1)], ids([5, 6, 7])), INVALID, "sequences"),
                (1, step([(SEQ, 0, 2), (live, 0, 1)], hidden=hidden_states(3, HIDDEN // 2)),
                 FAILED, "sequences[1].start_position"),
                (0, step([(SEQ, 0, 2)], ids([5, VOCAB])), INVALID, "token_ids"),
                (1, step([(SEQ, 0, 2)], hidden=truncated(hidden_states(2))), INVALID, "hidden_states.data"),
            ]
            for stage, request, code, field in bad:
                assert_status(await call_error(stages[stage].Step(iter([request]), timeout=10)), code, field)
            for stub in stages:
                freed = await stub.FreeSequences(stage_pb2.FreeSequencesRequest(sequence_ids=[SEQ, SEQ + 1]), timeout=10)
                assert freed.freed == 0
                info = await stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
                assert live in info.cached_sequence_ids  # the bad input really came mid-generation
            while (response := await call.read()) is not grpc.aio.EOF:
                tokens.append(response.token_id)
        assert tokens == harness.long_reference
        await harness.expect_serving()

    harness.run(body())


def test_update_placement_missing_expert(harness):
    async def body():
        placement = harness.mesh.router.state.cluster.placement()
        async with grpc_util.insecure_channel(harness.stage(1)) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            before = await stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
            missing = stage_pb2.ExpertPlacement(version=placement.version + 1, locations=[
                location for location in placement.locations if (location.layer, location.expert) != (1, 2)])
            assert_status(await call_error(stub.UpdatePlacement(missing, timeout=10)), FAILED, "locations")
            empty = stage_pb2.ExpertPlacement()
            empty.CopyFrom(placement)
            empty.version += 1
            index = [(l.layer, l.expert) for l in empty.locations].index((1, 3))
            del empty.locations[index].addresses[:]
            assert_status(await call_error(stub.UpdatePlacement(empty, timeout=10)),
                          INVALID, f"locations[{index}].addresses")
            after = await stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
        assert after.placement_version == before.placement_version
        await harness.expect_serving()

    harness.run(body())


def test_free_unknown_sequences(harness):
    async def body():
        for index in range(len(harness.mesh.stages)):
            async with grpc_util.insecure_channel(harness.stage(index)) as channel:
                reply = await stage_pb2_grpc.StageStub(channel).FreeSequences(
                    stage_pb2.FreeSequencesRequest(sequence_ids=[SEQ, SEQ + 7, 2**63]), timeout=10)
            assert reply.freed == 0
        await harness.expect_serving()

    harness.run(body())


def group(layer: int, expert: int, hidden: tensor_pb2.Tensor) -> expert_pb2.ExpertGroup:
    return expert_pb2.ExpertGroup(layer=layer, expert=expert, hidden_states=hidden)


GOOD = hidden_states(4, seed=1)
# (expert server index, groups, expert code, field named in the details). experts-a: layer 0 all, layer 1 {0, 1};
# experts-b: layer 1 {1, 2, 3}.
BAD_EXPERT_CALLS = {
    "expert_not_held": (0, [group(0, 0, GOOD), group(1, 3, GOOD)], NOT_FOUND, "groups[1].expert"),
    "expert_outside_model": (0, [group(0, 4, GOOD)], NOT_FOUND, "groups[0].expert"),
    "layer_not_held": (1, [group(1, 2, GOOD), group(0, 1, GOOD)], NOT_FOUND, "groups[1].layer"),
    "layer_outside_model": (0, [group(7, 0, GOOD)], NOT_FOUND, "groups[0].layer"),
    "wrong_width": (0, [group(0, 1, hidden_states(4, HIDDEN + 1))], INVALID, "groups[0].hidden_states"),
    "one_dimensional": (0, [group(0, 1, tensor([0.5] * HIDDEN))], INVALID, "groups[0].hidden_states"),
    "byte_length": (1, [group(1, 2, GOOD), group(1, 3, truncated(GOOD))], INVALID, "groups[1].hidden_states.data"),
    "wrong_dtype": (0, [group(0, 1, hidden_states(4, dtype=torch.float16))], INVALID, "groups[0].hidden_states"),
    "integer_dtype": (0, [group(0, 1, tensor([[1] * HIDDEN], torch.int64))], INVALID, "groups[0].hidden_states"),
    "unknown_dtype": (0, [group(0, 1, tensor_pb2.Tensor(dtype=42, shape=[1, HIDDEN], data=bytes(4 * HIDDEN)))],
                      INVALID, "groups[0].hidden_states.dtype"),
}


@pytest.mark.parametrize("case", BAD_EXPERT_CALLS)
def test_compute_experts_refuses(harness, case):
    server, groups, code, field = BAD_EXPERT_CALLS[case]
    layer = TOPOLOGY.expert_servers[server].experts[0][0]
    valid = expert_pb2.ComputeExpertsRequest(groups=[group(layer, TOPOLOGY.expert_servers[server].experts[0][1], GOOD)])

    async def body():
        address = harness.expert(server)
        before = await compute_experts(address, valid)
        async with grpc_util.insecure_channel(address) as channel:
            stub = expert_pb2_grpc.ExpertStub(channel)
            error = await call_error(stub.ComputeExperts(expert_pb2.ComputeExpertsRequest(groups=groups), timeout=10))
        assert_status(error, code, field)
        assert await compute_experts(address, valid) == before
        await harness.expect_serving()

    harness.run(body())


def test_large_message_passes(harness):
    """~40 MB of hidden states (well past gRPC's 4 MiB default) in one group, and the same back."""
    num_tokens = 40 * 2**20 // (4 * HIDDEN)
    small = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(3))   # [8, H]
    large = small.repeat(num_tokens // 8, 1)                                       # [num_tokens, H]

    async def body():
        address = harness.expert(0)
        reply = await compute_experts(address, expert_pb2.ComputeExpertsRequest(
            groups=[group(0, 2, codec.encode(small)), group(0, 2, codec.encode(large))]), timeout=60)
        expected = codec.decode(reply.outputs[0])                                  # [8, H]
        output = codec.decode(reply.outputs[1])
        assert list(output.shape) == [num_tokens, HIDDEN] and output.dtype == torch.float32
        # Every block of 8 rows is the small call's answer (up to matmul blocking; assert_close costs 1 s here).
        error = (output.view(-1, 8, HIDDEN) - expected).abs().max()
        assert error <= 1e-5 * expected.abs().max(), error
        await harness.expect_serving()

    harness.run(body())


def test_message_over_server_limit(harness, tiny_moe_model, monkeypatch):
    """A server refuses a message over its receive limit with RESOURCE_EXHAUSTED and keeps serving.
    (A separate expert server with a 1 MiB limit: the real 256 MiB would cost seconds to send.)"""
    limit = 2**20
    options = [(key, limit if key == "grpc.max_receive_message_length" else value)
               for key, value in grpc_util.SERVER_OPTIONS]
    monkeypatch.setattr(grpc_util, "SERVER_OPTIONS", options)
    valid = expert_pb2.ComputeExpertsRequest(groups=[group(0, 0, GOOD)])
    too_big = expert_pb2.ComputeExpertsRequest(groups=[group(0, 0, hidden_states(limit // (4 * HIDDEN) + 1))])

    async def body():
        config = ServiceConfig(model_dir=tiny_moe_model, name="experts-a", topology=TOPOLOGY)
        server = await start_expert_server(config)
        try:
            address = f"127.0.0.1:{server.port}"
            await grpc_util.wait_for_health(address, timeout=10)
            before = await compute_experts(address, valid)
            assert before == await compute_experts(harness.expert(0), valid)  # the same experts as the mesh's
            async with grpc_util.insecure_channel(address) as channel:
                error = await call_error(expert_pb2_grpc.ExpertStub(channel).ComputeExperts(too_big, timeout=10))
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                assert str(limit) in error.details(), error.details()
                # The same channel, and a fresh one, are served again.
                assert await expert_pb2_grpc.ExpertStub(channel).ComputeExperts(valid, timeout=10) == before
            assert await compute_experts(address, valid) == before
        finally:
            await server.stop(grace=None)
        await harness.expect_serving()

    harness.run(body())
