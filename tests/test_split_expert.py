"""A large expert split tensor-parallel over expert servers (w1/w3 by rows, w2 by columns, the
stage sums the slices' partial outputs): the mesh == transformers with concurrent requests; each
slice reads only its rows / columns; the slices sum to the whole expert; the topology file says
it; a server asked for a slice it does not hold answers NOT_FOUND naming the field."""

import asyncio

import grpc
import pytest
import torch

from mesh_helpers import check_against_reference, generate_staggered, local_mesh
from oracle import assert_logits_close
from shardmesh import codec
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard
from shardmesh.topology import ExpertServerSpec, ExpertSlice, StageSpec, Topology
from shardmesh.v1 import expert_pb2, expert_pb2_grpc

SPLIT = (0, 1, 2, 3)  # experts split in every layer; the others are whole on "experts-0"


def split_topology(num_layers: int, num_experts: int, tp: int, stage_tp: int = 1) -> Topology:
    servers = [f"big-{rank}" for rank in range(tp)]
    text = "\n".join([
        '[[stage]]\nname = "stage-0"\nlayers = [0, 2]\n',
        f'[[stage]]\nname = "stage-1"\nlayers = [2, {num_layers}]\ntp = {stage_tp}\n',
        f'[[expert_server]]\nname = "experts-0"\nexperts = {list(range(len(SPLIT), num_experts))}\n',
        f"[[split_expert]]\nexperts = {list(SPLIT)}\ntp = {tp}\nservers = {servers}\n".replace("'", '"')])
    return Topology.from_toml(text, num_layers)


@pytest.mark.parametrize("tp, stage_tp", [(2, 1), (3, 2)])  # (3, 2): a TP stage's ranks each send their tokens
def test_split_experts_mesh_matches_transformers(mixtral_dir, tp, stage_tp):
    config = ModelConfig.from_dir(mixtral_dir)
    topology = split_topology(config.num_layers, config.num_experts, tp, stage_tp).validate(config)
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=generator).tolist() for n in (7, 4, 10)]

    async def main():
        async with local_mesh(mixtral_dir, topology) as mesh:
            results = await generate_staggered(mesh.address, prompts, max_new_tokens=5)
            big = [s for s in mesh.experts if s.servicer.name.startswith("big-")]
            computed = [s.servicer.tokens_computed for s in big]
            # Every slice sees every token of its experts; a slice answers only for its own rank.
            address = f"127.0.0.1:{big[0].port}"
            async with grpc.aio.insecure_channel(address) as channel:
                group = expert_pb2.ExpertGroup(layer=0, expert=0, slice_rank=1, slice_count=tp,
                                               hidden_states=codec.encode(torch.zeros(2, config.hidden_size)))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await expert_pb2_grpc.ExpertStub(channel).ComputeExperts(
                        expert_pb2.ComputeExpertsRequest(groups=[group]), timeout=10)
            return results, computed, caught.value

    results, computed, error = asyncio.run(asyncio.wait_for(main(), 180))
    check_against_reference(mixtral_dir, prompts, results, 5, f"mixtral split experts tp={tp}, stage tp={stage_tp}")
    assert len(computed) == tp and computed[0] > 0 and len(set(computed)) == 1, computed
    assert error.code() == grpc.StatusCode.NOT_FOUND and "groups[0].slice_rank" in error.details()


@pytest.mark.parametrize("tp", [2, 4])
def test_each_slice_reads_only_its_rows_and_columns_and_the_slices_sum_to_the_expert(mixtral_dir, tp):
    config = ModelConfig.from_dir(mixtral_dir)
    H, I = config.hidden_size, config.intermediate_size
    hidden_states = torch.randn(5, H, generator=torch.Generator().manual_seed(2))  # [n, H]
    whole = ExpertShard(config, [(1, 6)], CheckpointReader(mixtral_dir)).compute(1, 6, hidden_states)
    partials = []
    for rank in range(tp):
        reader = CheckpointReader(mixtral_dir)
        shard = ExpertShard(config, [], reader, slices=[ExpertSlice(1, 6, rank, tp)])
        prefix = "model.layers.1.block_sparse_moe.experts.6."
        rows = (rank * I // tp, (rank + 1) * I // tp)
        assert sorted(reader.slices_read) == sorted([(prefix + "w1.weight", 0, *rows), (prefix + "w3.weight", 0, *rows),
                                                     (prefix + "w2.weight", 1, *rows)])
        assert reader.bytes_read == 3 * H * I // tp * 4, "a slice must read 1/tp of each weight, nothing else"
        assert shard.holds_slice(1, 6, rank, tp) and not shard.holds_slice(1, 6, (rank + 1) % tp, tp)
        partials.append(shard.compute_slice(1, 6, hidden_states))
    total = partials[0].clone()
    for partial in partials[1:]:
        total += partial
    assert_logits_close(total, whole, context=f"sum of {tp} slices vs the whole expert")


def test_topology_file_says_which_experts_are_split(mixtral_dir):
    config = ModelConfig.from_dir(mixtral_dir)
    topology = split_topology(config.num_layers, config.num_experts, 2).validate(config)
    big = topology.server("big-1")
    assert isinstance(big, ExpertServerSpec) and big.experts == ()
    assert ExpertSlice(3, 2, 1, 2) in big.slices and len(big.slices) == config.num_layers * len(SPLIT)
    assert topology.splits()[(0, 0)] == ["big-0", "big-1"] and (0, 0) not in topology.replicas()
    assert Topology.from_toml(topology.to_toml(), config.num_layers) == topology
    stages = (StageSpec("s", 0, config.num_layers),)
    everything = ExpertServerSpec("all", tuple((l, e) for l in range(config.num_layers) for e in range(8)))
    with pytest.raises(ValueError, match=r"split expert \(layer 0, expert 0\) is also held whole by \['all'\]"):
        Topology(stages, (everything, *topology.expert_servers)).validate(config)
    with pytest.raises(ValueError, match="tp = 3 but 2 servers"):
        Topology.from_toml('[[split_expert]]\nexperts = [0]\ntp = 3\nservers = ["a", "b"]\n', 4)
    with pytest.raises(ValueError, match="does not split into tp 5"):
        Topology.from_toml('[[stage]]\nname = "s"\nlayers = [0, 4]\n[[expert_server]]\nname = "x"\n'
                           'experts = [1, 2, 3, 4, 5, 6, 7]\n[[split_expert]]\nexperts = [0]\n'
                           'servers = ["a", "b", "c", "d", "e"]\n', 4).validate(config)
