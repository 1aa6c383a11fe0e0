"""Packed expert compute in place: a layer's groups as one tensor [N, H] computed into one output
[N, H] (kernels expert_ffn_packed, ExpertShard.compute_packed) with the bits of one expert at a
time, and that output lying in the shared-memory reply arena (ReplyArena.claim, codec.claim_reply)
so that encoding it copies nothing."""

import pytest
import torch

from shardmesh import codec, kernels
from shardmesh.shm_segment import ReplyArena, Segment
from shardmesh.v1 import expert_pb2, tensor_pb2


@pytest.fixture(scope="module")
def kernel():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    return loaded


@pytest.mark.parametrize("unit_bytes", [1, 14000, 1 << 20])
def test_packed_rows_get_each_experts_bits(kernel, unit_bytes):
    hidden, intermediate = 72, 136
    generator = torch.Generator().manual_seed(3)
    weights = [tuple(torch.randn(*shape, generator=generator) for shape in
                     ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))) for _ in range(4)]
    for counts in ([1, 1], [3, 0, 5, 2], [0, 7], [9]):
        hidden_states = torch.randn(sum(counts), hidden, generator=generator) * 2  # [N, H]
        expected = torch.cat([kernel.expert_ffn(x, *w) for x, w in
                              zip(hidden_states.split(counts), weights)])  # [N, H]
        for threads in (1, 2, 3):
            out = torch.full((sum(counts), hidden), float("nan"))
            kernel.expert_ffn_packed(hidden_states, weights[:len(counts)], counts, threads, out, unit_bytes)
            assert torch.equal(out, expected), (counts, threads)


@pytest.mark.parametrize("on_kernel", [True, False])
def test_shard_compute_packed_matches_compute(mixtral_dir, kernel, two_compute_threads, on_kernel):
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.errors import NotFound
    from shardmesh.expert_model import ExpertShard

    config = ModelConfig.from_dir(mixtral_dir)
    shard = ExpertShard(config, [(1, e) for e in range(config.num_experts)], CheckpointReader(mixtral_dir))
    if not on_kernel:  # the torch path: group by group, then copied into `out`
        for mlp in shard._mlps.values():
            mlp.kernel = None
    experts, counts = [0, 2, 3, 6], [2, 0, 3, 1]
    hidden_states = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(4))  # [N, H]
    before = kernels.calls["expert_ffn_many"]
    out = torch.full_like(hidden_states, float("nan"))
    assert shard.compute_packed(1, experts, counts, hidden_states, out) is out
    assert kernels.calls["expert_ffn_many"] == before + on_kernel
    expected = torch.cat([shard.compute(1, e, x) for e, x in zip(experts, hidden_states.split(counts))])
    assert torch.equal(out, expected)
    with pytest.raises(NotFound, match="layer 0, expert 2"):
        shard.compute_packed(0, [2], [6], hidden_states, out)


def test_a_claimed_reply_is_encoded_where_it_was_computed():
    segment = Segment.create(1 << 16)
    try:
        arena = ReplyArena(segment, 128)
        claimed, span = arena.claim([3, 4], torch.float32)
        claimed.copy_(torch.arange(12.0).view(3, 4))  # "computed" in place
        assert span == (128, 48)  # where it lies: the wire Tensor names it, nothing is written
        assert torch.equal(segment.view(128, 48, torch.float32, [3, 4], "t"), torch.arange(12.0).view(3, 4))
        other = torch.ones(2, 2)
        assert arena.put(other) == (192, 16)  # any other tensor is copied after the claim
        assert arena.put(claimed) == (256, 48)  # an encode of the claimed one copies, like any tensor
        assert arena.claim([1 << 20], torch.float32) is None  # no room: the caller makes its own
        assert arena.claim([0, 4], torch.float32) is None

        output, placed = codec.claim_reply([2, 3], torch.float32)
        assert placed is None and output.data_ptr() != 0  # no call served here: a new tensor
        reply_arena = ReplyArena(segment, 1024)
        token = codec.inbound_call.set((segment, reply_arena, None))
        try:
            output, placed = codec.claim_reply([2, 3], torch.float32)
            output.copy_(torch.full((2, 3), 7.0))
            message = tensor_pb2.Tensor()
            codec.encode_into(message, output, placed)
        finally:
            codec.inbound_call.reset(token)
        assert (message.shm.offset, message.shm.length, list(message.shape)) == (1024, 24, [2, 3])
        assert torch.equal(codec.decode(message, "t", segment=segment), torch.full((2, 3), 7.0))

        # claim_reply + encode_into: the same, built into the response, the arena asked nothing more
        token = codec.inbound_call.set((segment, ReplyArena(segment, 2048), None))
        try:
            output, placed = codec.claim_reply(torch.Size([2, 3]), torch.float32)
            output.copy_(torch.full((2, 3), 5.0))
            response = expert_pb2.ComputeExpertsResponse()
            codec.encode_into(response.packed_outputs, output, placed)
        finally:
            codec.inbound_call.reset(token)
        message = response.packed_outputs
        assert placed == (2048, 24) and not message.data and list(message.shape) == [2, 3]
        assert (message.dtype, message.shm.offset, message.shm.length) == (tensor_pb2.DTYPE_FLOAT32, 2048, 24)
        assert torch.equal(codec.decode(message, "t", segment=segment), torch.full((2, 3), 5.0))
        output, placed = codec.claim_reply([2, 3], torch.float32)  # no call served here: a new tensor, placed by encode
        response = expert_pb2.ComputeExpertsResponse()
        codec.encode_into(response.packed_outputs, output.fill_(2.0), placed)
        assert placed is None and torch.equal(codec.decode(response.packed_outputs), torch.full((2, 3), 2.0))
    finally:
        segment.close()


def test_packed_plans_follow_the_experts_held(mixtral_dir, kernel, two_compute_threads):
    """A (layer, experts) list's modules are remembered (ExpertShard.packed_plan) only while those
    experts are held: after a remove the same list is refused, after an add it computes again."""
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.errors import NotFound
    from shardmesh.expert_model import ExpertShard

    config = ModelConfig.from_dir(mixtral_dir)
    reader = CheckpointReader(mixtral_dir)
    shard = ExpertShard(config, [(1, e) for e in range(config.num_experts)], reader)
    experts, counts = [5, 2], [1, 2]
    hidden_states = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(5))  # [N, H]
    expected = torch.cat([shard.compute(1, e, x) for e, x in zip(experts, hidden_states.split(counts))])
    out = torch.empty_like(hidden_states)
    assert torch.equal(shard.compute_packed(1, experts, counts, hidden_states, out), expected)
    assert shard.packed_plan(1, experts) is shard.packed_plan(1, (5, 2))  # remembered
    shard.remove([(1, 2)])
    assert shard.packed_plan(1, experts) is None
    with pytest.raises(NotFound, match="layer 1, expert 2"):
        shard.compute_packed(1, experts, counts, hidden_states, out)
    shard.add([(1, 2)], reader)
    assert torch.equal(shard.compute_packed(1, experts, counts, hidden_states, torch.empty_like(out)), expected)
    # more entries than the layer has experts (not what a stage sends): computed, not remembered
    many = [2] * (config.num_experts + 1)
    rows = torch.randn(len(many), config.hidden_size)  # [N, H]
    assert torch.equal(shard.compute_packed(1, many, [1] * len(many), rows, torch.empty_like(rows)),
                       torch.cat([shard.compute(1, 2, row[None]) for row in rows]))
    assert (1, tuple(many)) not in shard._plans


def test_an_expert_table_in_use_leaves_a_concurrent_call_to_its_own_tasks(mixtral_dir, kernel, two_compute_threads):
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.expert_model import ExpertShard

    config = ModelConfig.from_dir(mixtral_dir)
    shard = ExpertShard(config, [(0, e) for e in range(3)], CheckpointReader(mixtral_dir))
    experts, counts = [2, 0, 1], [2, 1, 3]
    hidden_states = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(6))  # [N, H]
    expected = torch.cat([shard.compute(0, e, x) for e, x in zip(experts, hidden_states.split(counts))])
    plan = shard.packed_plan(0, experts)
    assert plan.table is not None
    with plan.table.lock:  # another thread's call is filling the table's tasks
        out = shard.compute_packed(0, experts, counts, hidden_states, torch.empty_like(hidden_states))
    assert torch.equal(out, expected)
    assert torch.equal(shard.compute_packed(0, experts, counts, hidden_states, torch.empty_like(out)), expected)
    tasks, row_bytes = plan.table.tasks, 4 * config.hidden_size  # as the last call filled them
    assert [tasks[i].n for i in range(3)] == counts
    assert [tasks[i + 1].x - tasks[i].x for i in range(2)] == [n * row_bytes for n in counts[:2]]
    assert [tasks[i + 1].out - tasks[i].out for i in range(2)] == [n * row_bytes for n in counts[:2]]
    assert [tasks[i + 1].scratch - tasks[i].scratch for i in range(2)] == \
        [4 * 2 * n * config.intermediate_size for n in counts[:2]]  # [2, n, I] fp32 each, apart


def test_expert_scratch_is_kept_per_thread_and_reused_dirty(mixtral_dir, kernel, two_compute_threads):
    """The kernels' scratch is one buffer per thread (Kernel.scratch): a later call reuses it as the
    last left it (the same address, full of old values) and computes the same bits."""
    from shardmesh import kernels
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.expert_model import ExpertShard

    config = ModelConfig.from_dir(mixtral_dir)
    shard = ExpertShard(config, [(0, e) for e in range(2)], CheckpointReader(mixtral_dir))
    experts, counts = [1, 0], [3, 2]
    hidden_states = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(7))  # [N, H]
    expected = torch.cat([shard.compute(0, e, x) for e, x in zip(experts, hidden_states.split(counts))])
    plan = shard.packed_plan(0, experts)
    first = shard.compute_packed(0, experts, counts, hidden_states, torch.empty_like(hidden_states))
    address = plan.table.tasks[0].scratch
    kernels.kernel().scratch(2 * config.intermediate_size * 5)[0].fill_(float("nan"))  # dirty, as any call leaves it
    second = shard.compute_packed(0, experts, counts, hidden_states, torch.empty_like(hidden_states))
    assert plan.table.tasks[0].scratch == address  # the same buffer: nothing allocated
    assert torch.equal(first, expected) and torch.equal(second, expected)
    held, _ = kernels.kernel().scratch(kernels.MAX_KEPT_SCRATCH + 1)  # too big to keep: made for that call
    assert kernels.kernel().scratch(1)[1] == address and held.data_ptr() != address
