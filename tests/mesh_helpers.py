"""Helpers for tests that run a whole mesh in-process over real gRPC on loopback."""

import asyncio
import contextlib

import torch

from shardmesh.client import AsyncClient
from shardmesh.local_mesh import start_local_mesh
from shardmesh.topology import ExpertServerSpec, StageSpec, Topology

from oracle import assert_greedy_matches, reference_greedy


def topology(stages: list[tuple[int, int]], expert_servers: list[list[int]] = (), num_layers: int | None = None) -> Topology:
    """stages as (start, end); expert_servers as lists of expert ids held in every layer."""
    num_layers = num_layers or stages[-1][1]
    return Topology(
        tuple(StageSpec(f"stage-{i}", a, b) for i, (a, b) in enumerate(stages)),
        tuple(ExpertServerSpec(f"experts-{i}", tuple(sorted((l, e) for l in range(num_layers) for e in ids)))
              for i, ids in enumerate(expert_servers)))


@contextlib.asynccontextmanager
async def local_mesh(model_dir, topo: Topology | None = None, **kwargs):
    mesh = await start_local_mesh(model_dir, topo, **kwargs)
    try:
        yield mesh
    finally:
        await mesh.stop()


async def generate_staggered(address: str, prompts: list[list[int]], max_new_tokens: int, join_after: int = 2,
                             **generate_kwargs) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Start prompts[0]; start each next prompt once the previous one has produced `join_after`
    tokens (so requests join a running batch mid-way). Returns (tokens, step logits) per prompt."""
    results: list = [None] * len(prompts)
    async with AsyncClient(address, timeout=120) as client:
        started = [asyncio.Event() for _ in prompts]

        async def one(i: int):
            if i > 0:
                await started[i - 1].wait()
            tokens, logits = [], []
            async for token in client.generate(prompts[i], max_new_tokens=max_new_tokens, ignore_eos=True,
                                               return_logits=True, **generate_kwargs):
                tokens.append(token.token_id)
                logits.append(torch.tensor(token.logits))
                if len(tokens) >= join_after:
                    started[i].set()
            started[i].set()
            results[i] = (tokens, logits)

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return results


def check_against_reference(model_dir, prompts, results, max_new_tokens: int, context: str) -> None:
    for i, (prompt, (tokens, logits)) in enumerate(zip(prompts, results)):
        ref_tokens, ref_logits = reference_greedy(model_dir, prompt, max_new_tokens)
        assert_greedy_matches(tokens, logits, ref_tokens, ref_logits, context=f"{context} prompt {i}")
