"""Client SDK against a fake router (tests/fake_router.py) served in-process over the real wire."""

import asyncio
import pickle
import socket
import time

import grpc
import pytest

from fake_router import VOCAB, FakeRouter, expected_logits
from shardmesh import client_errors
from shardmesh.client import (
    AsyncClient, Client, DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError, ShardmeshError,
    UnavailableError,
)
from shardmesh.client_types import decode_logits
from shardmesh.v1 import tensor_pb2

TYPED = {
    "INVALID_ARGUMENT": client_errors.InvalidArgumentError,
    "NOT_FOUND": client_errors.NotFoundError,
    "FAILED_PRECONDITION": client_errors.FailedPreconditionError,
    "RESOURCE_EXHAUSTED": client_errors.ResourceExhaustedError,
    "UNAVAILABLE": client_errors.UnavailableError,
    "DEADLINE_EXCEEDED": client_errors.DeadlineExceededError,
    "CANCELLED": client_errors.CancelledError,
    "UNAUTHENTICATED": client_errors.UnauthenticatedError,
}
ALL_CODES = [code.name for code in grpc.StatusCode if code is not grpc.StatusCode.OK]


@pytest.fixture(scope="module")
def fake_router():
    with FakeRouter() as router:
        yield router


@pytest.fixture
def router(fake_router):
    fake_router.servicer.reset()
    return fake_router


@pytest.fixture
def client(router):
    with Client(router.address, timeout=10) as client:
        yield client


def closed_port_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_sync_stream_order_and_request_fields(client, router):
    tokens = list(client.generate([5, 6], max_new_tokens=4, temperature=0.7, top_k=3, top_p=0.9, seed=11))
    assert [t.token_id for t in tokens] == [7, 8, 9, 10]
    assert [t.index for t in tokens] == [0, 1, 2, 3]
    assert [t.text for t in tokens] == ["t7 ", "t8 ", "t9 ", "t10 "]
    assert [t.finish_reason for t in tokens] == [None, None, None, "length"]
    assert {t.prompt_tokens for t in tokens} == {2} and all(t.logits is None for t in tokens)
    (request,) = router.servicer.requests
    assert list(request.prompt_token_ids) == [5, 6] and request.prompt_text == ""
    assert request.max_new_tokens == 4 and request.sampling.top_k == 3 and request.sampling.seed == 11
    assert request.sampling.temperature == pytest.approx(0.7) and request.sampling.top_p == pytest.approx(0.9)


def test_text_prompt_stop_token_and_unset_optionals(client, router):
    generation = client.generate_all("hello", max_new_tokens=10, stop_token_ids=[7], ignore_eos=True)
    assert generation.token_ids == [6, 7] and generation.finish_reason == "stop"
    assert generation.text == "t6 t7 " and generation.prompt_tokens == 5
    (request,) = router.servicer.requests
    assert request.prompt_text == "hello" and not request.prompt_token_ids and request.ignore_eos
    assert not request.sampling.HasField("top_p") and not request.sampling.HasField("seed")


def test_logits_decode(client):
    tokens = client.generate_all([1], max_new_tokens=3, return_logits=True).tokens
    assert [t.logits for t in tokens] == [expected_logits(t.token_id) for t in tokens]
    assert all(len(t.logits) == VOCAB for t in tokens)


def test_decode_logits_reads_what_the_codec_writes():
    torch = pytest.importorskip("torch")
    from shardmesh import codec

    logits = torch.randn(2, 5, dtype=torch.float32)
    assert decode_logits(codec.encode(logits)) == tuple(logits.flatten().tolist())
    assert decode_logits(codec.encode(logits.t())) == tuple(logits.t().flatten().tolist())


@pytest.mark.parametrize("tensor, field", [
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT16, shape=[2], data=b"\0" * 4), "logits.dtype"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3], data=b"\0" * 8), "logits.data"),
    (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1], data=b""), "logits.shape"),
])
def test_decode_logits_rejects_malformed_tensors(tensor, field):
    with pytest.raises(ShardmeshError, match=field) as info:
        decode_logits(tensor)
    assert info.value.code == "INTERNAL"


@pytest.mark.parametrize("code", ALL_CODES)
def test_every_status_maps_to_its_error(client, code):
    with pytest.raises(ShardmeshError) as info:
        client.generate_all(f"abort:{code}")
    assert type(info.value) is TYPED.get(code, ShardmeshError)
    assert info.value.code == code and info.value.details == f"fake {code} for this prompt"


def test_error_after_some_tokens(client):
    received = []
    with pytest.raises(UnavailableError, match="after 2 tokens"):
        for token in client.generate("abort:UNAVAILABLE:2", max_new_tokens=5):
            received.append(token.index)
    assert received == [0, 1]


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": b"raw"}, "prompt"),
    ({"prompt": [1, 2.5]}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": [1], "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": [1], "top_k": -1}, "top_k"),
    ({"prompt": [1], "seed": -3}, "seed"),
    ({"prompt": [1], "temperature": "hot"}, "temperature"),
])
def test_local_argument_errors_send_nothing(client, router, kwargs, field):
    with pytest.raises(InvalidArgumentError, match=f"^INVALID_ARGUMENT: {field}:"):
        client.generate(**kwargs)
    assert router.servicer.requests == []


def test_deadline_exceeded_after_first_token(router):
    with Client(router.address, timeout=0.3) as client:
        received = []
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            for token in client.generate("hang"):
                received.append(token.index)
    assert received == [0] and time.monotonic() - start < 5
    assert router.servicer.cancelled.wait(timeout=5)


def test_break_cancels_the_call_on_the_server(client, router):
    for _token in client.generate("hang"):
        break
    assert router.servicer.cancelled.wait(timeout=5)
    router.servicer.cancelled.clear()
    with client.generate("hang") as stream:
        assert next(stream).index == 0
    assert router.servicer.cancelled.wait(timeout=5)
    assert list(stream) == []  # a closed stream just ends


def test_receive_limit_is_configurable(router):
    with Client(router.address, timeout=10, max_receive_message_bytes=32) as client:
        assert len(client.generate_all([1], max_new_tokens=2).tokens) == 2
        with pytest.raises(ResourceExhaustedError):
            client.generate_all([1], max_new_tokens=2, return_logits=True)  # 8 fp32 logits > 32 bytes


def test_model_info_and_cluster_status(client):
    info = client.model_info()
    assert info.family == "llama" and info.vocab_size == VOCAB and list(info.eos_token_ids) == [2]
    status = client.cluster_status()
    assert status.serving and [server.name for server in status.servers] == ["stage-0", "stage-1"]


def test_wait_until_serving_polls_until_serving(client, router):
    router.servicer.serving_after = 3
    assert client.wait_until_serving(timeout=10).serving
    assert router.servicer.status_calls == 4


def test_wait_until_serving_times_out_with_what_it_saw(client, router):
    router.servicer.serving_after = 10**9
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="1/2 servers registered"):
        client.wait_until_serving(timeout=2.0)  # room for a first answer on a loaded machine
    assert 2.0 <= time.monotonic() - start < 6


def test_wait_until_serving_unreachable_router():
    with Client(closed_port_address()) as client:
        with pytest.raises(DeadlineExceededError, match="UNAVAILABLE"):
            client.wait_until_serving(timeout=0.3)


def test_wait_until_serving_raises_other_errors_at_once(client, router):
    router.servicer.status_error = grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(ShardmeshError, match="UNIMPLEMENTED"):
        client.wait_until_serving(timeout=10)
    assert router.servicer.status_calls == 1


def test_errors_pickle():
    for error in (InvalidArgumentError("prompt: empty"), ShardmeshError("INTERNAL", "boom")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and (copy.code, copy.details) == (error.code, error.details)


def test_async_client(router):
    async def main():
        async with AsyncClient(router.address, timeout=10) as client:
            tokens = [token async for token in client.generate([5], max_new_tokens=3, return_logits=True)]
            assert [t.token_id for t in tokens] == [6, 7, 8] and tokens[-1].finish_reason == "length"
            assert tokens[0].logits == expected_logits(6)
            assert (await client.generate_all("hi", stop_token_ids=[3])).token_ids == [3]
            for code in ("INVALID_ARGUMENT", "UNAVAILABLE", "ABORTED"):
                with pytest.raises(TYPED.get(code, ShardmeshError)):
                    await client.generate_all(f"abort:{code}")
            with pytest.raises(DeadlineExceededError):
                await client.generate_all("hang", timeout=0.3)
            assert (await client.model_info()).family == "llama"
            router.servicer.serving_after = router.servicer.status_calls + 2
            assert (await client.wait_until_serving(timeout=10)).serving
        async with AsyncClient(closed_port_address()) as client:
            with pytest.raises(DeadlineExceededError, match="UNAVAILABLE"):
                await client.wait_until_serving(timeout=0.3)

    asyncio.run(main())


def test_async_break_and_aclose_cancel_the_call(router):
    async def cancelled_on_server():
        for _ in range(500):
            if router.servicer.cancelled.is_set():
                router.servicer.cancelled.clear()
                return True
            await asyncio.sleep(0.01)
        return False

    async def main():
        async with AsyncClient(router.address, timeout=10) as client:
            async for _token in client.generate("hang"):
                break
            assert await cancelled_on_server()
            async with client.generate("hang") as stream:
                assert (await anext(stream)).index == 0
            assert await cancelled_on_server()
            stream = client.generate("hang")
            await anext(stream)
            await stream.aclose()
            assert await cancelled_on_server()
            assert [token async for token in stream] == []

    asyncio.run(main())
