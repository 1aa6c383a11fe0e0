"""Router features over the real wire: cancellation frees KV everywhere, seeded sampling,
text prompts, model info and cluster status."""

import asyncio

import grpc

from shardmesh.client import AsyncClient
from shardmesh.reference import transformers_greedy
from shardmesh.text import TextCodec
from shardmesh.v1 import stage_pb2, stage_pb2_grpc

from mesh_helpers import local_mesh


async def cached_on_every_stage(mesh) -> list[list[int]]:
    cached = []
    for stage in mesh.stages:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stage.port}") as channel:
            info = await stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=5)
            cached.append(sorted(info.cached_sequence_ids))
    return cached


async def wait_until(predicate, timeout: float = 2.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_cancelled_streams_free_their_kv_on_every_stage(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir) as mesh, AsyncClient(mesh.address, timeout=60) as client:
            keep = client.generate([1, 5, 9, 13], max_new_tokens=40, ignore_eos=True)
            cancel = [client.generate([1, 7 + i], max_new_tokens=200, ignore_eos=True) for i in range(3)]
            first_kept = await keep.__anext__()
            for stream in cancel:
                await stream.__anext__()
            cached = await cached_on_every_stage(mesh)
            assert all(len(ids) == 4 for ids in cached), cached
            for stream in cancel:
                await stream.aclose()

            async def only_one_left():
                return all(len(ids) == 1 for ids in await cached_on_every_stage(mesh))
            await wait_until(only_one_left, timeout=1.0)
            rest = [token.token_id async for token in keep]

            async def none_left():
                return all(ids == [] for ids in await cached_on_every_stage(mesh))
            await wait_until(none_left)
            return [first_kept.token_id] + rest

    tokens = asyncio.run(asyncio.wait_for(main(), 60))
    assert tokens == transformers_greedy(mixtral_dir, [1, 5, 9, 13], 40, ignore_eos=True)


def test_seeded_sampling_repeats_and_seeds_differ(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir) as mesh, AsyncClient(mesh.address, timeout=60) as client:
            kwargs = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, ignore_eos=True)
            # The same seed alone and in a batch with others gives the same tokens.
            alone = (await client.generate_all([1, 2, 3], seed=11, **kwargs)).token_ids
            together = await asyncio.gather(*(client.generate_all([1, 2, 3], seed=s, **kwargs) for s in (11, 12, 11)))
            return alone, [g.token_ids for g in together]

    alone, (a, b, c) = asyncio.run(asyncio.wait_for(main(), 60))
    assert alone == a == c
    assert a != b


def test_text_prompt_streams_text_pieces(mixtral_dir):
    prompt = "The mesh splits a model"

    async def main():
        async with local_mesh(mixtral_dir) as mesh, AsyncClient(mesh.address, timeout=60) as client:
            info = await client.model_info()
            generation = await client.generate_all(prompt, max_new_tokens=10, ignore_eos=True)
            return info, generation

    info, generation = asyncio.run(asyncio.wait_for(main(), 60))
    assert info.has_tokenizer and info.family == "mixtral" and info.num_experts == 8
    text = TextCodec.from_model_dir(mixtral_dir)
    prompt_ids = text.encode(prompt)
    assert generation.tokens[0].prompt_tokens == len(prompt_ids)
    assert generation.token_ids == transformers_greedy(mixtral_dir, prompt_ids, 10, ignore_eos=True)
    assert generation.text == text.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
    assert generation.finish_reason == "length"


def test_eos_stops_unless_ignored(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir) as mesh, AsyncClient(mesh.address, timeout=60) as client:
            free_run = (await client.generate_all([1, 4, 4], max_new_tokens=6, ignore_eos=True)).token_ids
            stop_at = free_run[2]
            stopped = await client.generate_all([1, 4, 4], max_new_tokens=6, stop_token_ids=[stop_at],
                                                ignore_eos=True)
            return free_run, stopped

    free_run, stopped = asyncio.run(asyncio.wait_for(main(), 60))
    first = free_run.index(free_run[2])
    assert stopped.token_ids == free_run[:first + 1]
    assert stopped.finish_reason == "stop"


def test_cluster_status_lists_every_server(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir) as mesh, AsyncClient(mesh.address, timeout=60) as client:
            return await client.cluster_status(), mesh

    status, mesh = asyncio.run(asyncio.wait_for(main(), 60))
    assert status.serving
    names = {s.name: s for s in status.servers}
    assert set(names) == {"stage-0", "stage-1", "experts-a", "experts-b"}
    assert all(s.registered and s.address.startswith("127.0.0.1:") for s in status.servers)
    assert (names["stage-1"].layers.start, names["stage-1"].layers.end) == (2, 4)
