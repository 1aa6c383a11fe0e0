"""The promise: whatever the topology, the mesh gives transformers' logits (fp32, 1e-4 relative)
at every step and its greedy tokens, with concurrent requests of different prompt lengths joining
mid-way. Every service is a real grpc.aio server on loopback."""

import asyncio

import pytest

from mesh_helpers import check_against_reference, generate_staggered, local_mesh, topology

PROMPTS = [[1, 17, 33, 5, 90, 61, 7], [1, 44], [1, 8, 120, 3, 3, 77, 19, 4, 250, 11, 60], [1, 200, 9]]
MAX_NEW_TOKENS = 8

MOE_TOPOLOGIES = {
    "one-stage-one-expert-server": ([(0, 4)], [list(range(8))]),
    "two-stages-experts-on-two": ([(0, 2), (2, 4)], [[0, 1, 2, 3], [4, 5, 6, 7]]),
    "three-stages-uneven-experts-on-three-with-replicas": ([(0, 1), (1, 3), (3, 4)],
                                                            [[0, 1, 2, 3], [3, 4, 5], [5, 6, 7, 0]]),
}


def run_topology(model_dir, stages, expert_servers, prompts, context):
    vocab_cap = 160  # every fixture's vocab is >= 160
    prompts = [[t % vocab_cap for t in p] for p in prompts]

    async def main():
        async with local_mesh(model_dir, topology(stages, expert_servers)) as mesh:
            return await generate_staggered(mesh.address, prompts, MAX_NEW_TOKENS)

    results = asyncio.run(asyncio.wait_for(main(), 120))
    check_against_reference(model_dir, prompts, results, MAX_NEW_TOKENS, context)


@pytest.mark.parametrize("name", MOE_TOPOLOGIES)
def test_mixtral_gqa(mixtral_dir, name):
    stages, experts = MOE_TOPOLOGIES[name]
    run_topology(mixtral_dir, stages, experts, PROMPTS, f"mixtral {name}")


def test_mixtral_odd_layers_mha_top3(mixtral_odd_dir):
    # 5 layers split 1 + 3 + 1; 6 experts top-3 on three servers, experts 0 and 3 replicated.
    run_topology(mixtral_odd_dir, [(0, 1), (1, 4), (4, 5)], [[0, 1, 3], [2, 3, 4], [5, 0]], PROMPTS,
                 "mixtral odd")


@pytest.mark.parametrize("stages", [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 2), (2, 4)]],
                         ids=["one-stage", "two-stages", "three-stages-uneven"])
def test_llama_gqa(llama_dir, stages):
    run_topology(llama_dir, stages, [], PROMPTS, f"llama {stages}")


def test_llama_odd_layers_mha_tied_embeddings(llama_mha_dir):
    run_topology(llama_mha_dir, [(0, 2), (2, 3)], [], PROMPTS, "llama mha")
