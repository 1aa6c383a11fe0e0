"""A per-caller limit at the router (router/caller_limit.py), over the real wire: a caller holding
`--max-sequences-per-caller` sequences gets RESOURCE_EXHAUSTED naming the field at once, another
caller is still served with the right tokens, and the caller is served again once one of its
streams ends. Callers are told apart by host (the default: two connections from loopback are one
caller) or by connection."""

import asyncio
import time

import grpc
import pytest

from shardmesh.reference import transformers_greedy
from shardmesh.v1 import router_pb2, router_pb2_grpc

from router.caller_limit import CallerLimit, caller_of
from wire_helpers import ModuleMesh

PER_CALLER = 2
HOLD_TOKENS = 2000  # more than any machine generates within a test's deadlines
# Each channel its own TCP connection (grpc shares one between channels with the same arguments).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def long_context_dir(make_model_dir):
    from conftest import VARIANTS
    return make_model_dir(**{**VARIANTS["mixtral"], "max_position_embeddings": 4096})


@pytest.fixture(scope="module")
def mesh(long_context_dir):
    running = ModuleMesh.start(long_context_dir, router_options=dict(
        max_batch_sequences=8, max_queued=8, max_sequences_per_caller=PER_CALLER))
    yield running
    running.stop()


def request(prompt, new_tokens):
    return router_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)


async def refused_then_served(mesh: ModuleMesh):
    """Caller A (one connection) holds PER_CALLER streams; returns how A's next call and a call from a
    second connection B end, A's next call after one of its streams ended, and B's tokens if served."""
    async with grpc.aio.insecure_channel(mesh.address, options=OWN_CONNECTION) as a_channel, \
            grpc.aio.insecure_channel(mesh.address, options=OWN_CONNECTION) as b_channel:
        a, b = router_pb2_grpc.RouterStub(a_channel), router_pb2_grpc.RouterStub(b_channel)
        holders = [a.Generate(request([1, 5 + i], HOLD_TOKENS), timeout=120) for i in range(PER_CALLER)]
        for stream in holders:
            await stream.read()  # the first token: the sequence is held

        async def outcome(stub):
            start = time.monotonic()
            try:
                tokens = [r.token_id async for r in stub.Generate(request([1, 9, 27, 81], 4), timeout=60)]
                return grpc.StatusCode.OK, tokens, time.monotonic() - start
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details(), time.monotonic() - start

        a_over, b_call = await outcome(a), await outcome(b)
        holders[0].cancel()
        held = mesh.mesh.router.state.caller_limit.held
        for _ in range(1000):  # the router sees the cancellation and releases the sequence (bounded wait)
            if sum(held.values()) < PER_CALLER:
                break
            await asyncio.sleep(0.01)
        a_again = await outcome(a)
        for stream in holders[1:]:
            stream.cancel()
        for _ in range(1000):  # the router releases them as it sees the cancellations (bounded wait)
            if not held:
                break
            await asyncio.sleep(0.01)
        return a_over, b_call, a_again


def test_a_caller_past_its_limit_is_refused_and_others_are_served(mesh, long_context_dir):
    mesh.mesh.router.state.caller_limit.identity = "connection"
    try:
        a_over, b_call, a_again = mesh.run(refused_then_served(mesh))
    finally:
        mesh.mesh.router.state.caller_limit.identity = "host"
    expected = transformers_greedy(long_context_dir, [1, 9, 27, 81], 4, ignore_eos=True)
    code, details, seconds = a_over
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, a_over
    assert details.startswith("caller:") and "--max-sequences-per-caller" in details, details
    assert seconds < 5.0, a_over  # at once: no step runs for it (bound holds at load average ~10)
    assert b_call[:2] == (grpc.StatusCode.OK, expected), b_call
    assert a_again[:2] == (grpc.StatusCode.OK, expected), a_again
    assert not mesh.mesh.router.state.caller_limit.held  # every sequence released


def test_by_host_two_connections_from_one_host_are_one_caller(mesh):
    a_over, b_call, a_again = mesh.run(refused_then_served(mesh))
    for refused in (a_over, b_call):
        assert refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "ipv4:127.0.0.1 already holds 2 sequences" in refused[1], refused
    assert a_again[0] == grpc.StatusCode.OK, a_again
    assert not mesh.mesh.router.state.caller_limit.held


class FakeContext:
    def __init__(self, peer: str, auth: dict | None = None):
        self._peer, self._auth = peer, auth or {}

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return self._auth


def test_caller_identity():
    assert caller_of(FakeContext("ipv4:10.0.0.5:4242"), "host") == "ipv4:10.0.0.5"
    assert caller_of(FakeContext("ipv6:[::1]:4242"), "host") == "ipv6:[::1]"
    assert caller_of(FakeContext("ipv4:10.0.0.5:4242"), "connection") == "ipv4:10.0.0.5:4242"
    assert caller_of(FakeContext("unix:/tmp/s"), "host") == "unix:/tmp/s"
    certified = FakeContext("ipv4:10.0.0.5:4242", {"x509_common_name": [b"client-7"]})
    assert caller_of(certified, "connection") == caller_of(certified, "host") == "certificate:client-7"


def test_limit_counts_and_releases():
    limit = CallerLimit(2, "connection")
    a, b = FakeContext("ipv4:10.0.0.5:1"), FakeContext("ipv4:10.0.0.5:2")
    held = [limit.acquire(a), limit.acquire(a), limit.acquire(b)]
    from shardmesh.errors import ResourceExhausted
    with pytest.raises(ResourceExhausted) as refused:
        limit.acquire(a)
    assert refused.value.field == "caller"
    for caller in held:
        limit.release(caller)
    assert not limit.held
    assert CallerLimit(0).acquire(a) is None  # no limit: nothing counted
    with pytest.raises(ValueError):
        CallerLimit(-1)
    with pytest.raises(ValueError):
        CallerLimit(1, "token")
