"""Named client tokens (shardmesh/client_tokens.py, the router's `--auth-tokens-file`): any of them
opens the client API, a wrong one is UNAUTHENTICATED, and with `--caller-identity token` the token's
name is the caller: per-caller limits count per token even over one shared connection."""

import argparse

import grpc
import pytest

from shardmesh.client_tokens import ClientTokens
from shardmesh.reference import transformers_greedy
from shardmesh.security import Security, add_service_security_arguments, service_security
from shardmesh.v1 import router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc

from wire_helpers import ModuleMesh

TOKENS = {"alice": "alice-secret-0123456789", "bob": "bob-secret-0123456789"}
INTERNAL_TOKEN = "internal-secret-9876543210"
PROMPT, NEW_TOKENS, HOLD_TOKENS = [1, 9, 27, 81], 4, 4000


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def test_a_tokens_file_is_read_and_checked(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# name token\n\nalice  alice-secret-0123456789\nbob\tbob-secret-0123456789\n")
    tokens = ClientTokens.from_file(path, default_token="single-token-0123456789")
    assert tokens.names == ["default", "alice", "bob"]
    assert tokens.name_of("Bearer alice-secret-0123456789") == "alice"
    assert tokens.name_of(b"Bearer bob-secret-0123456789") == "bob"
    assert tokens.name_of("Bearer single-token-0123456789") == "default"
    for wrong in ("Bearer alice-secret-012345678", "Bearer alice-secret-0123456789x", "alice-secret-0123456789",
                  "bearer alice-secret-0123456789", "Bearer ", ""):
        assert tokens.name_of(wrong) is None, wrong
    assert "secret" not in repr(tokens)
    assert tokens.caller_name([("x", "y"), ("authorization", "Bearer bob-secret-0123456789")]) == "bob"
    for text, why in [("alice a-token-0123\nalice b-token-0123\n", "twice"),
                      ("alice same-token-0123\nbob same-token-0123\n", "same token"),
                      ("alice\n", "NAME TOKEN"), ("alice one two\n", "NAME TOKEN"),
                      ("-alice a-token-0123\n", "letters"), ("# nothing\n", "no client tokens")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=why):
            ClientTokens.from_file(path)


def router_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_service_security_arguments(parser, "router")
    return parser.parse_args(list(extra))


def test_the_router_takes_a_tokens_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SHARDMESH_AUTH_TOKEN", raising=False)
    tokens, internal = tmp_path / "tokens", tmp_path / "internal"
    tokens.write_text("alice alice-secret-0123456789\n")
    internal.write_text(INTERNAL_TOKEN)
    security = service_security(router_args("--auth-tokens-file", str(tokens), "--internal-token-file", str(internal)),
                                "router")
    assert security.accepted_client_tokens.names == ["alice"]
    assert security.server_interceptors()  # checked
    with pytest.raises(ValueError, match="--no-auth contradicts"):
        service_security(router_args("--auth-tokens-file", str(tokens), "--no-auth"), "router")
    # The single token, when also given, is named "default"; a stage never holds client tokens.
    single = tmp_path / "single"
    single.write_text("single-token-0123456789")
    both = service_security(router_args("--auth-tokens-file", str(tokens), "--auth-token-file", str(single),
                                        "--internal-token-file", str(internal)), "router")
    assert both.accepted_client_tokens.names == ["default", "alice"]
    stage_parser = argparse.ArgumentParser()
    add_service_security_arguments(stage_parser, "stage")
    stage = service_security(stage_parser.parse_args(["--internal-token-file", str(internal)]), "stage")
    assert stage.accepted_client_tokens is None


@pytest.fixture(scope="module")
def mesh(make_model_dir):
    from conftest import VARIANTS
    model_dir = make_model_dir(**{**VARIANTS["mixtral"], "max_position_embeddings": 4096})
    security = Security(client_tokens=ClientTokens(TOKENS), internal_token=INTERNAL_TOKEN)
    running = ModuleMesh.start(model_dir, security=security, router_options=dict(
        max_batch_sequences=4, max_queued=4, max_sequences_per_caller=1, caller_identity="token"))
    running.model_dir = model_dir
    yield running
    running.stop()


def request(prompt, new_tokens):
    return router_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)


def test_each_token_is_a_caller_over_one_connection(mesh):
    """alice holds her one sequence; her next call is refused naming her token's name, while bob,
    on the very same connection, is served with transformers' tokens; a wrong token, or the internal
    one, is UNAUTHENTICATED; a client token does not open a stage."""

    async def outcome(call):
        try:
            return grpc.StatusCode.OK, [r.token_id async for r in call]
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()

    async def body():
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            held = stub.Generate(request([1, 5], HOLD_TOKENS), timeout=120, metadata=bearer(TOKENS["alice"]))
            await held.read()  # alice's one sequence is held
            results = {
                "alice again": await outcome(stub.Generate(request(PROMPT, NEW_TOKENS), timeout=60,
                                                           metadata=bearer(TOKENS["alice"]))),
                "bob": await outcome(stub.Generate(request(PROMPT, NEW_TOKENS), timeout=60,
                                                   metadata=bearer(TOKENS["bob"]))),
                "wrong": await outcome(stub.Generate(request(PROMPT, NEW_TOKENS), timeout=60,
                                                     metadata=bearer(TOKENS["bob"] + "x"))),
                "internal": await outcome(stub.Generate(request(PROMPT, NEW_TOKENS), timeout=60,
                                                        metadata=bearer(INTERNAL_TOKEN))),
            }
            held.cancel()
        async with grpc.aio.insecure_channel(mesh.addresses()["stage"][0]) as channel:
            try:
                await stage_pb2_grpc.StageStub(channel).GetStageInfo(
                    stage_pb2.GetStageInfoRequest(), timeout=30, metadata=bearer(TOKENS["alice"]))
                results["stage"] = grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as error:
                results["stage"] = error.code(), error.details()
        return results

    results = mesh.run(body())
    code, details = results["alice again"]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("caller: token:alice already holds 1"), \
        results["alice again"]
    assert results["bob"] == (grpc.StatusCode.OK, transformers_greedy(mesh.model_dir, PROMPT, NEW_TOKENS,
                                                                       ignore_eos=True))
    for name in ("wrong", "internal", "stage"):
        assert results[name][0] == grpc.StatusCode.UNAUTHENTICATED, (name, results[name])


@pytest.mark.slow
def test_the_router_process_takes_named_tokens(llama_dir, tmp_path):
    """`shardmesh router --auth-tokens-file F --caller-identity token` as a process (`shardmesh up`'s
    launcher, which also gives it its own `--auth-token-file`: named `default`): each named token
    and the default one are served with transformers' tokens; a wrong one is UNAUTHENTICATED."""
    import asyncio

    from shardmesh.client import AsyncClient, UnauthenticatedError
    from shardmesh.launcher import Launcher

    tokens_file = tmp_path / "client-tokens"
    tokens_file.write_text("".join(f"{name} {token}\n" for name, token in TOKENS.items()))
    router_args = ["--auth-tokens-file", str(tokens_file), "--caller-identity", "token",
                   "--max-sequences-per-caller", "1", "--tarpit-refusals-per-second", "50"]
    expected = transformers_greedy(llama_dir, PROMPT, NEW_TOKENS, ignore_eos=True)

    async def generate(address, token):
        async with AsyncClient(address, timeout=60, token=token) as client:
            return (await client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids

    with Launcher(llama_dir, service_args={"router": router_args}) as launcher:
        for token in (TOKENS["alice"], TOKENS["bob"], launcher.client_token):
            assert asyncio.run(generate(launcher.router_address, token)) == expected
        with pytest.raises(UnauthenticatedError):
            asyncio.run(generate(launcher.router_address, TOKENS["alice"] + "x"))


def test_a_caller_that_keeps_asking_past_its_limit_is_held(mesh):
    """With the tarpit on (router/tarpit.py), alice asking again and again while she holds her one
    sequence gets her `caller` refusals late once she is flooding, with backoff metadata."""
    import asyncio
    import time

    from router.tarpit import Tarpit, TarpitConfig

    state = mesh.mesh.router.state

    async def body():
        for _ in range(1000):  # the router has released the sequences of earlier tests (bounded wait)
            if not state.caller_limit.held:
                break
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            held = stub.Generate(request([1, 5], HOLD_TOKENS), timeout=120, metadata=bearer(TOKENS["alice"]))
            await held.read()  # alice's one sequence is held
            state.tarpit = Tarpit(TarpitConfig(refusals_per_second=2, base_delay_s=0.25, max_delay_s=0.5))
            refusals, end = [], time.monotonic() + 2.5

            async def loop():
                while time.monotonic() < end:
                    start = time.monotonic()
                    try:
                        await stub.Generate(request(PROMPT, 1), timeout=10, metadata=bearer(TOKENS["alice"])).read()
                    except grpc.aio.AioRpcError as error:
                        refusals.append((start, time.monotonic() - start, error.code(), error.details(),
                                         dict(error.trailing_metadata() or ())))
            try:
                await asyncio.gather(*(loop() for _ in range(4)))  # held 0.5 s each: ~8/s, over the 2/s
            finally:
                state.tarpit = None
                held.cancel()
            return refusals

    refusals = mesh.run(body())
    assert refusals and all(r[2] == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refusals)
    settled = [r for r in refusals if r[0] >= refusals[0][0] + 1.0]  # past the threshold's burst
    assert settled, refusals
    for _, seconds, _, details, metadata in settled:
        assert seconds >= 0.25 and details.startswith("caller: token:alice already holds 1"), (seconds, details)
        assert "back off" in details and metadata.get("retry-after") == "1", (details, metadata)
