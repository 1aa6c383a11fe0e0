"""The last stage chooses greedy tokens (StepRequest.greedy_token_ids): a step whose sequences all
sample greedily and want no logits comes back as token ids, not [B, V] logits, over a two-stage
mesh (the first stage ignores the flag), and the tokens are transformers' greedy ones. A request
wanting logits in the same batch makes those steps carry logits again."""

import asyncio

from shardmesh.client import AsyncClient
from shardmesh.sampling import GreedyTokens

from mesh_helpers import local_mesh, topology
from oracle import assert_greedy_matches, reference_greedy
from router.pipeline import StagePipeline

PROMPTS = [[1, 17, 33, 5, 90], [1, 44], [1, 8, 120, 3, 3, 77, 19]]
NEW_TOKENS = 6


def test_greedy_steps_get_token_ids_from_the_last_stage(mixtral_dir, monkeypatch):
    kinds = []  # what each pipeline step returned
    step = StagePipeline.step

    async def spy(self, slices, token_ids, greedy=False):
        result = await step(self, slices, token_ids, greedy)
        kinds.append((greedy, type(result).__name__))
        return result

    monkeypatch.setattr(StagePipeline, "step", spy)

    async def main(logits_for: set[int]):
        async with local_mesh(mixtral_dir, topology([(0, 2), (2, 4)], [list(range(8))])) as mesh:
            async with AsyncClient(mesh.address, timeout=120) as client:
                async def one(i: int):
                    return [t.token_id async for t in client.generate(
                        PROMPTS[i], max_new_tokens=NEW_TOKENS, ignore_eos=True, return_logits=i in logits_for)]
                return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    tokens = asyncio.run(asyncio.wait_for(main(set()), 120))
    assert kinds and all(kind == (True, GreedyTokens.__name__) for kind in kinds), kinds
    for prompt, ours in zip(PROMPTS, tokens):
        ref_tokens, ref_logits = reference_greedy(mixtral_dir, prompt, NEW_TOKENS)
        assert_greedy_matches(ours, None, ref_tokens, ref_logits, context=f"prompt {prompt}")

    kinds.clear()
    mixed = asyncio.run(asyncio.wait_for(main({1}), 120))  # prompt 1 wants logits: its steps carry them
    assert (False, "Tensor") in kinds, kinds
    assert mixed == tokens
