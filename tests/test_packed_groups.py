"""ComputeExperts' packed form (expert.proto PackedGroups: a layer's groups in one tensor, what stages
send): the expert server answers it with the same bits as the per-group form, refuses every bad
packed request with a precise status naming the field (and keeps serving), and the stage's side
(stage_server/packed_groups.py) refuses a bad answer as the server's failure."""

import pytest
import torch

from bad_input_harness import (HIDDEN, INVALID, NOT_FOUND, TOPOLOGY, assert_status, call_error, compute_experts,
                               harness, hidden_states, tiny_moe_model)  # noqa: F401  (fixtures)
from shardmesh import codec, grpc_util
from shardmesh.errors import Unavailable
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2

from stage_server.packed_groups import PackedCall

# experts-a (server 0) holds layer 0 all, layer 1 {0, 1}
LAYOUTS = {"one group": [(2, 3)], "two groups of one row": [(0, 1), (3, 1)], "uneven": [(1, 5), (0, 2), (3, 7)],
           "an expert twice": [(2, 2), (2, 3)]}


def rows(seed: int, count: int) -> torch.Tensor:
    return torch.randn(count, HIDDEN, generator=torch.Generator().manual_seed(seed))  # [count, H]


def packed(layer: int, experts: list[int], num_tokens: list[int], hidden: tensor_pb2.Tensor) -> expert_pb2.ComputeExpertsRequest:
    return expert_pb2.ComputeExpertsRequest(packed=expert_pb2.PackedGroups(
        layer=layer, experts=experts, num_tokens=num_tokens, hidden_states=hidden))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_answer_is_the_groups_answer(harness, layout):
    """Each group's rows of the packed answer are bit-identical to its answer in the per-group form."""
    inputs = [rows(seed, count) for seed, (_, count) in enumerate(LAYOUTS[layout])]  # [n_i, H] each
    experts = [expert for expert, _ in LAYOUTS[layout]]

    async def body():
        address = harness.expert(0)
        by_group = await compute_experts(address, expert_pb2.ComputeExpertsRequest(groups=[
            expert_pb2.ExpertGroup(layer=0, expert=e, hidden_states=codec.encode(x)) for e, x in zip(experts, inputs)]))
        reply = await compute_experts(address, packed(0, experts, [x.shape[0] for x in inputs],
                                                      codec.encode(torch.cat(inputs))))
        assert not reply.outputs
        outputs = codec.decode(reply.packed_outputs).split([x.shape[0] for x in inputs])
        for output, expected in zip(outputs, by_group.outputs, strict=True):
            assert torch.equal(output, codec.decode(expected))

    harness.run(body())


GOOD = hidden_states(4, seed=1)  # [4, H]
# (expert server index, request, code, field named in the details)
BAD_PACKED_CALLS = {
    "groups_and_packed": (0, expert_pb2.ComputeExpertsRequest(
        groups=[expert_pb2.ExpertGroup(layer=0, expert=0, hidden_states=GOOD)],
        packed=expert_pb2.PackedGroups(layer=0, experts=[0], num_tokens=[4], hidden_states=GOOD)), INVALID, "packed"),
    "fewer_counts": (0, packed(0, [0, 1], [4], GOOD), INVALID, "packed.num_tokens"),
    "more_counts": (0, packed(0, [0], [2, 2], GOOD), INVALID, "packed.num_tokens"),
    "counts_short_of_rows": (0, packed(0, [0, 1], [1, 2], GOOD), INVALID, "packed.num_tokens"),
    "counts_past_rows": (0, packed(0, [0, 1], [4, 2**32 - 1], GOOD), INVALID, "packed.num_tokens"),
    "expert_not_held": (0, packed(1, [0, 3], [2, 2], GOOD), NOT_FOUND, "packed.experts[1]"),
    "expert_outside_model": (0, packed(0, [4], [4], GOOD), NOT_FOUND, "packed.experts[0]"),
    "layer_not_held": (1, packed(0, [1], [4], GOOD), NOT_FOUND, "packed.layer"),
    "no_hidden_states": (0, packed(0, [0], [4], tensor_pb2.Tensor()), INVALID, "packed.hidden_states.dtype"),
    "wrong_width": (0, packed(0, [0], [4], hidden_states(4, HIDDEN + 1)), INVALID, "packed.hidden_states"),
    "wrong_dtype": (0, packed(0, [0], [4], hidden_states(4, dtype=torch.float16)), INVALID, "packed.hidden_states"),
    "byte_length": (0, packed(0, [0], [4], tensor_pb2.Tensor(dtype=GOOD.dtype, shape=GOOD.shape, data=GOOD.data[:-1])),
                    INVALID, "packed.hidden_states.data"),
    "shm_span_over_grpc": (0, packed(0, [0], [1], tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, HIDDEN], shm=tensor_pb2.SharedMemorySpan(offset=64, length=4 * HIDDEN))),
        INVALID, "packed.hidden_states.shm"),
}


@pytest.mark.parametrize("case", BAD_PACKED_CALLS)
def test_bad_packed_call_refused(harness, case):
    server, request, code, field = BAD_PACKED_CALLS[case]
    layer, expert = TOPOLOGY.expert_servers[server].experts[0]
    valid = packed(layer, [expert], [4], GOOD)

    async def body():
        address = harness.expert(server)
        before = await compute_experts(address, valid)
        async with grpc_util.insecure_channel(address) as channel:
            error = await call_error(expert_pb2_grpc.ExpertStub(channel).ComputeExperts(request, timeout=10))
        assert_status(error, code, field)
        assert await compute_experts(address, valid) == before
        await harness.expect_serving()

    harness.run(body())


def decode(message, field):
    return codec.decode(message, field, segment=None)


def test_stage_side_packs_and_unpacks():
    inputs = [rows(1, 2), rows(2, 1), rows(3, 3)]
    call = PackedCall("host:1", 5, [4, 0, 7], inputs)
    request = call.request(lambda x: codec.encode(x, arena=None))
    assert (request.packed.layer, list(request.packed.experts), list(request.packed.num_tokens)) == (5, [4, 0, 7], [2, 1, 3])
    assert not request.groups and torch.equal(decode(request.packed.hidden_states, "x"), torch.cat(inputs))
    answer = torch.cat(inputs) * 2
    outputs = call.outputs(expert_pb2.ComputeExpertsResponse(packed_outputs=codec.encode(answer, arena=None)), decode)
    assert [o.shape[0] for o in outputs] == [2, 1, 3]
    assert all(torch.equal(o, x * 2) for o, x in zip(outputs, inputs, strict=True))


BAD_ANSWERS = {  # answer, what the error says
    "per-group answer": (expert_pb2.ComputeExpertsResponse(outputs=[codec.encode(rows(0, 3), arena=None)]),
                         "no packed_outputs"),
    "too few rows": (expert_pb2.ComputeExpertsResponse(packed_outputs=codec.encode(rows(0, 2), arena=None)),
                     "answered \\[2, 32\\]"),
    "another dtype": (expert_pb2.ComputeExpertsResponse(packed_outputs=codec.encode(rows(0, 3).half(), arena=None)),
                      "torch.float16 for"),
    "bad bytes": (expert_pb2.ComputeExpertsResponse(packed_outputs=tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, HIDDEN], data=b"x")), "sent a bad tensor: packed_outputs.data"),
}


@pytest.mark.parametrize("answer", BAD_ANSWERS)
def test_stage_side_refuses_a_bad_answer(answer):
    """A bad answer is the server's failure: Unavailable naming it (and what was wrong)."""
    reply, says = BAD_ANSWERS[answer]
    call = PackedCall("host:1", 0, [1, 2], [rows(1, 1), rows(2, 2)])
    with pytest.raises(Unavailable, match=f"expert server host:1 .*{says}"):
        call.outputs(reply, decode)
