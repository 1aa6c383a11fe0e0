"""The oracle promise with the throughput machinery explicitly set: the foundation's topologies give
transformers' logits and greedy tokens with micro-batches in flight, prompts prefilled in small
chunks while other requests decode, and tensors over the shared-memory data plane, and also with
all of it off (one step at a time, whole prompts, tensors in gRPC messages)."""

import asyncio

import pytest

from mesh_helpers import check_against_reference, generate_staggered, local_mesh, topology
from test_mesh_oracle import MAX_NEW_TOKENS, MOE_TOPOLOGIES, PROMPTS

SETTINGS = {
    # 3 lanes (more than some topologies have stages); prompts of 7 and 11 tokens go in 3-token chunks.
    "microbatched-chunked-shm": dict(data_plane="shm", router_options=dict(micro_batches=3, prefill_chunk_tokens=3)),
    # The same over gRPC: several steps in flight on each Step stream.
    "microbatched-chunked-grpc": dict(data_plane="grpc", router_options=dict(micro_batches=3, prefill_chunk_tokens=3)),
    "serial-whole-grpc": dict(data_plane="grpc", router_options=dict(micro_batches=1, prefill_chunk_tokens=0)),
}


def run(model_dir, stages, expert_servers, settings: dict, context: str) -> None:
    prompts = [[t % 160 for t in p] for p in PROMPTS]

    async def main():
        async with local_mesh(model_dir, topology(stages, expert_servers), **settings) as mesh:
            planes = [s.servicer.experts.data_planes for s in mesh.stages] + [mesh.router.state.pipeline.data_planes]
            results = await generate_staggered(mesh.address, prompts, MAX_NEW_TOKENS, join_after=1)
            # Which plane carried the tensors: every peer on shared memory, or none.
            used = [channel is not None for p in planes for channel in p._channels.values()]
            return results, used

    results, used = asyncio.run(asyncio.wait_for(main(), 120))
    if settings["data_plane"] == "shm":
        assert used and all(used), f"peers left on gRPC bytes: {used}"
    else:
        assert not any(used), f"shared memory used with data_plane=grpc: {used}"
    check_against_reference(model_dir, prompts, results, MAX_NEW_TOKENS, context)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", MOE_TOPOLOGIES)
def test_mixtral_topologies(mixtral_dir, name, setting):
    stages, experts = MOE_TOPOLOGIES[name]
    run(mixtral_dir, stages, experts, SETTINGS[setting], f"mixtral {name} {setting}")


@pytest.mark.parametrize("setting", SETTINGS)
def test_llama_two_stages(llama_dir, setting):
    run(llama_dir, [(0, 2), (2, 4)], [], SETTINGS[setting], f"llama two stages {setting}")
