"""A layer's experts over helper threads (kernels expert_ffn_many, expert_team.c) and the expert
server computing with it: bit-identical to expert_ffn one expert at a time, for any number of
threads and any cut of the experts into units (the failover tests rely on a row's bits not
depending on how the work is cut)."""

import threading

import pytest
import torch

from shardmesh import kernels
from shardmesh.models.layers import SwiGLUMLP


@pytest.fixture(scope="module")
def kernel():
    loaded = kernels.kernel()
    assert loaded is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    return loaded


def experts(hidden, intermediate, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(intermediate, hidden, generator=generator), torch.randn(intermediate, hidden, generator=generator),
             torch.randn(hidden, intermediate, generator=generator)) for _ in range(count)]


# 72/136 and 13/7: not multiples of the vector width (silu's scalar tail, an odd w2 row paired with
# itself); unit_bytes small enough to cut every expert into several units of each kind, or large
# enough for one unit each.
@pytest.mark.parametrize("hidden, intermediate", [(72, 136), (13, 7), (64, 256)])
@pytest.mark.parametrize("unit_bytes", [1, 2048, 14000, 1 << 20])
def test_every_cut_and_thread_count_gives_expert_ffns_bits(kernel, hidden, intermediate, unit_bytes):
    weights = experts(hidden, intermediate, 5)
    generator = torch.Generator().manual_seed(1)
    for rows in ([1, 1], [3, 0, 5, 1, 8], [17, 2, 40], [70], [0, 0], []):
        # gate values on both sides of silu's bend, so its vector and scalar paths both matter
        inputs = [(torch.randn(n, hidden, generator=generator) * 2, *weights[i % 5]) for i, n in enumerate(rows)]
        expected = [kernel.expert_ffn(*expert) for expert in inputs]
        for threads in (1, 2, 3):
            outputs = kernel.expert_ffn_many(inputs, threads, unit_bytes)
            assert len(outputs) == len(expected)
            for out, reference, (x, *_) in zip(outputs, expected, inputs):
                assert out.shape == (x.shape[0], hidden) and out.dtype == torch.float32
                assert torch.equal(out, reference), (rows, threads, unit_bytes)


def test_helpers_take_units_and_down_units_wait_for_the_activations(kernel):
    # One expert: its down units come right after its activation units in the order, so a thread
    # takes the first down unit while the other may still compute the last activations.
    weights = experts(64, 256, 1, seed=6)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    expected = kernel.expert_ffn(x, *weights[0])
    before = kernels.units["by_helpers"]
    for attempt in range(300):
        assert torch.equal(kernel.expert_ffn_many([(x, *weights[0])], 2, 1)[0], expected), attempt
        if attempt >= 50 and kernels.units["by_helpers"] > before:
            break
    assert kernels.units["by_helpers"] > before, "the helper thread never took a unit in 300 calls"


def test_concurrent_callers_each_get_their_own_results(kernel):
    # One caller at a time has the helpers; another computes alone at once. Neither waits for,
    # nor writes into, the other's outputs.
    weights = experts(64, 256, 4, seed=2)
    generator = torch.Generator().manual_seed(3)
    calls = [[(torch.randn(n, 64, generator=generator), *weights[i]) for i, n in enumerate((2, 1, 4, 3))]
             for _ in range(4)]
    expected = [[kernel.expert_ffn(*expert) for expert in inputs] for inputs in calls]
    failures = []

    def caller(index):
        for _ in range(30):
            outputs = kernel.expert_ffn_many(calls[index], 2, 2048)
            if not all(torch.equal(a, b) for a, b in zip(outputs, expected[index])):
                failures.append(index)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads) and failures == []


def test_swiglu_many_uses_the_kernel_only_where_every_expert_can(kernel):
    weights = experts(40, 48, 3, seed=4)
    mlps = [SwiGLUMLP(*w) for w in weights]
    inputs = [torch.randn(n, 40) for n in (1, 3, 2)]
    before = kernels.calls["expert_ffn_many"]
    outputs = SwiGLUMLP.many(mlps, inputs, 2)
    assert kernels.calls["expert_ffn_many"] == before + 1
    assert all(torch.equal(out, mlp(x)) for out, mlp, x in zip(outputs, mlps, inputs))
    assert SwiGLUMLP.many(mlps, [x.double() for x in inputs], 2) is None  # float64 inputs: not the kernel
    assert SwiGLUMLP.many(mlps[:2] + [SwiGLUMLP(*(w.double() for w in weights[2]))], inputs, 2) is None
    assert SwiGLUMLP.many([], [], 2) is None


def test_expert_shard_computes_a_layer_in_one_call_with_the_same_bits(mixtral_dir, kernel, two_compute_threads):
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.errors import NotFound
    from shardmesh.expert_model import ExpertShard

    config = ModelConfig.from_dir(mixtral_dir)
    shard = ExpertShard(config, [(1, e) for e in range(config.num_experts)], CheckpointReader(mixtral_dir))
    generator = torch.Generator().manual_seed(5)
    groups = [(1, e, torch.randn(n, config.hidden_size, generator=generator)) for e, n in zip(range(8), (3, 1, 0, 5, 2, 2, 1, 4))]
    before = kernels.calls["expert_ffn_many"]
    outputs = shard.compute_many(groups)
    assert kernels.calls["expert_ffn_many"] == before + 1
    assert all(torch.equal(out, shard.compute(*group)) for out, group in zip(outputs, groups))
    with pytest.raises(NotFound, match="layer 0, expert 2"):
        shard.compute_many(groups[:1] + [(0, 2, groups[0][2])])
