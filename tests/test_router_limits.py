"""Limits local to the router, over the real wire: a bounded admission queue (past it Generate
gets RESOURCE_EXHAUSTED at once, the admitted requests finish with the right tokens), a request
over the router's size limit gets RESOURCE_EXHAUSTED, and a client deadline ends the stream and
frees the sequence's KV on every stage while other streams go on."""

import asyncio
import time

import grpc
import pytest

from shardmesh.client import AsyncClient, DeadlineExceededError, ResourceExhaustedError
from shardmesh.reference import transformers_greedy
from shardmesh.v1 import router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc

from router.main import MAX_REQUEST_BYTES
from wire_helpers import ModuleMesh

MAX_BATCH, MAX_QUEUED = 2, 1
FREE_BOUND_S = 3.0  # a step takes ~10 ms here; seen 1.3 s under a load average of 9
HOLD_TOKENS = 2000  # more than any machine generates within a test's deadlines
DEADLINE_S = 3.0


@pytest.fixture(scope="module")
def long_context_dir(make_model_dir):
    """The `mixtral_dir` model shape with room for HOLD_TOKENS."""
    from conftest import VARIANTS
    return make_model_dir(**{**VARIANTS["mixtral"], "max_position_embeddings": 4096})


@pytest.fixture(scope="module")
def mesh(long_context_dir):
    running = ModuleMesh.start(long_context_dir,
                               router_options=dict(max_batch_sequences=MAX_BATCH, max_queued=MAX_QUEUED))
    yield running
    running.stop()


async def cached_on_every_stage(mesh: ModuleMesh) -> list[list[int]]:
    cached = []
    for address in mesh.addresses()["stage"]:
        async with grpc.aio.insecure_channel(address) as channel:
            info = await stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=5)
            cached.append(sorted(info.cached_sequence_ids))
    return cached


async def wait_until(predicate, timeout: float) -> float:
    """Poll `predicate` (a coroutine function) until true; return the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await predicate():
        assert loop.time() - start < timeout, f"condition not reached within {timeout} s"
        await asyncio.sleep(0.01)
    return loop.time() - start


def test_admission_queue_refuses_at_once_past_its_bound(mesh, long_context_dir):
    async def body():
        async with AsyncClient(mesh.address, timeout=120) as client:
            holders = [client.generate([1, 5 + i], max_new_tokens=HOLD_TOKENS, ignore_eos=True) for i in range(2)]
            for stream in holders:
                await stream.__anext__()            # both batch slots taken
            queued = asyncio.create_task(client.generate_all([1, 9, 27, 81], max_new_tokens=8, ignore_eos=True))

            async def one_waiting():
                return (await client.cluster_status()).active_sequences == MAX_BATCH + MAX_QUEUED
            await wait_until(one_waiting, timeout=10)
            start = time.monotonic()
            with pytest.raises(ResourceExhaustedError) as refused:
                await client.generate_all([1, 2, 3], max_new_tokens=4)
            refused_after = time.monotonic() - start
            assert not queued.done()                # still waiting for a slot
            await holders[0].aclose()               # a slot frees: the queued request runs
            generation = await asyncio.wait_for(queued, 30)
            await holders[1].aclose()
            admitted_again = (await client.generate_all([1, 2, 3], max_new_tokens=4, ignore_eos=True)).token_ids
            return refused.value, refused_after, generation.token_ids, admitted_again

    refused, refused_after, queued_tokens, admitted_again = mesh.run(body())
    assert "--max-queued" in refused.details and refused_after < 1.0, (refused, refused_after)
    assert queued_tokens == transformers_greedy(long_context_dir, [1, 9, 27, 81], 8, ignore_eos=True)
    assert admitted_again == transformers_greedy(long_context_dir, [1, 2, 3], 4, ignore_eos=True)


def test_request_over_the_size_limit_is_refused(mesh, long_context_dir):
    too_big = router_pb2.GenerateRequest(prompt_text="a" * (MAX_REQUEST_BYTES + 1), max_new_tokens=1)

    async def body():
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Generate(too_big, timeout=30):
                    pass
            with pytest.raises(grpc.aio.AioRpcError) as refused_registry:
                await router_pb2_grpc.RegistryStub(channel).RegisterServer(
                    router_pb2.RegisterServerRequest(name="x" * (MAX_REQUEST_BYTES + 1)), timeout=30)
            # The same channel is served again.
            served = [r.token_id async for r in stub.Generate(router_pb2.GenerateRequest(
                prompt_token_ids=[1, 9, 27, 81], max_new_tokens=4, ignore_eos=True), timeout=30)]
            return refused.value, refused_registry.value, served

    refused, refused_registry, served = mesh.run(body())
    for error in (refused, refused_registry):
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert str(MAX_REQUEST_BYTES) in error.details(), error.details()
    assert served == transformers_greedy(long_context_dir, [1, 9, 27, 81], 4, ignore_eos=True)


def test_client_deadline_frees_the_sequence_on_every_stage(mesh, long_context_dir):
    async def body():
        async with AsyncClient(mesh.address, timeout=120) as client:
            other = asyncio.create_task(client.generate_all([1, 9, 27, 81], max_new_tokens=40, ignore_eos=True))

            async def until_deadline():
                with pytest.raises(DeadlineExceededError):
                    async for _ in client.generate([1, 4, 4], max_new_tokens=HOLD_TOKENS, ignore_eos=True,
                                                   timeout=DEADLINE_S):
                        pass
            expiring = asyncio.create_task(until_deadline())

            async def both_cached():  # the expiring sequence holds KV on every stage
                return other.done() or all(len(ids) == 2 for ids in await cached_on_every_stage(mesh))
            await wait_until(both_cached, timeout=DEADLINE_S)
            live_before_deadline = not other.done()
            await expiring

            async def freed():  # only `other` (if still running) may remain cached
                cached = await cached_on_every_stage(mesh)
                return all(len(ids) <= (0 if other.done() else 1) for ids in cached)
            # Freed at the next step boundary; the bound leaves room for a loaded 2-core machine.
            took = await wait_until(freed, timeout=FREE_BOUND_S)
            tokens = (await other).token_ids
            await wait_until(lambda: _none_cached(mesh), timeout=FREE_BOUND_S)
            return live_before_deadline, took, tokens

    live_before_deadline, took, tokens = mesh.run(body())
    assert live_before_deadline and took < FREE_BOUND_S
    assert tokens == transformers_greedy(long_context_dir, [1, 9, 27, 81], 40, ignore_eos=True)


async def _none_cached(mesh) -> bool:
    return all(ids == [] for ids in await cached_on_every_stage(mesh))


def test_refusal_under_overload_reads_nothing_of_the_request(mesh):
    """router.admission.AdmissionGate refuses before the request is parsed (the cheap path): bytes
    that are no GenerateRequest at all get RESOURCE_EXHAUSTED, not the parser's INVALID_ARGUMENT."""
    from wire_helpers import Rpc, raw_call

    async def body():
        async with AsyncClient(mesh.address, timeout=120) as client:
            holders = [client.generate([1, 5 + i], max_new_tokens=HOLD_TOKENS, ignore_eos=True) for i in range(2)]
            for stream in holders:
                await stream.__anext__()            # both batch slots taken
            queued = asyncio.create_task(client.generate_all([1, 9, 27, 81], max_new_tokens=8, ignore_eos=True))

            async def full():
                return (await client.cluster_status()).active_sequences == MAX_BATCH + MAX_QUEUED
            await wait_until(full, timeout=10)
            generate = Rpc("/shardmesh.v1.Router/Generate", False, True)
            async with grpc.aio.insecure_channel(mesh.address) as channel:
                answer = await raw_call(channel, generate, b"\xff\xff\xff")
                for stream in holders:
                    await stream.aclose()
                await asyncio.wait_for(queued, 30)
                after = await raw_call(channel, generate, b"\xff\xff\xff")
            return answer, after

    (code, details, responses), (code_after, details_after, _) = mesh.run(body())
    assert (code, responses) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 0) and details.startswith("router: "), details
    assert code_after == grpc.StatusCode.INVALID_ARGUMENT, details_after  # not full: parsed, and refused as garbage
