"""Bearer tokens over the real wire: the public Router service takes the client token only; the
Registry, Stage and Expert services take the internal token only (a client token never opens
them); grpc.health.v1 is open; reflection takes either token. A refused call gets
UNAUTHENTICATED before its bytes are parsed, and the mesh keeps serving."""

import asyncio
import types

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh.client import AsyncClient, Client, UnauthenticatedError
from shardmesh.mesh_secrets import MeshSecrets
from shardmesh.reference import transformers_greedy
from shardmesh.security import Security, service_security
from shardmesh.v1 import router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc

from wire_helpers import ModuleMesh, raw_call, rpcs_of

CLIENT_TOKEN, INTERNAL_TOKEN = "client-secret-0123456789", "internal-secret-9876543210"
PROMPT, NEW_TOKENS = [1, 9, 27, 81], 6
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
OPEN = {"grpc.health.v1.Health"}
CLIENT_ONLY = {"shardmesh.v1.Router"}
INTERNAL_ONLY = {"shardmesh.v1.Registry", "shardmesh.v1.Stage", "shardmesh.v1.Expert", "shardmesh.v1.Admin"}


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


WRONG_CREDENTIALS = {
    "none": (),
    "wrong": bearer("not-the-token"),
    "one_char_off": bearer(CLIENT_TOKEN[:-1] + "x"),
    "prefix_of_token": bearer(CLIENT_TOKEN[:8]),
    "no_bearer_word": (("authorization", CLIENT_TOKEN),),
    "lowercase_bearer": (("authorization", f"bearer {CLIENT_TOKEN}"),),
}


@pytest.fixture(scope="module")
def mesh(mixtral_dir):
    running = ModuleMesh.start(mixtral_dir, security=Security(client_token=CLIENT_TOKEN, internal_token=INTERNAL_TOKEN))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(mixtral_dir):
    return transformers_greedy(mixtral_dir, PROMPT, NEW_TOKENS, ignore_eos=True)


def service_of(rpc) -> str:
    return rpc.path.lstrip("/").rpartition("/")[0]


def test_every_rpc_of_every_port_checks_its_token(mesh, reference):
    """Garbage bytes (not a message) with each credential: the token decides before any parsing."""
    answers = {}

    async def body():
        for kind, addresses in mesh.addresses().items():
            async with grpc.aio.insecure_channel(addresses[0]) as channel:
                for rpc in rpcs_of(kind):
                    credentials = {**WRONG_CREDENTIALS, "client": bearer(CLIENT_TOKEN),
                                   "internal": bearer(INTERNAL_TOKEN)}
                    for name, metadata in credentials.items():
                        code, details, _ = await raw_call(channel, rpc, b"\xff\xffnot protobuf", metadata)
                        answers[(kind, rpc.path, name)] = (code, details)
        async with AsyncClient(mesh.address, timeout=60, token=CLIENT_TOKEN) as client:
            return (await client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids

    tokens = mesh.run(body())
    for (kind, path, name), (code, details) in answers.items():
        service = path.lstrip("/").rpartition("/")[0]
        accepted = (set() if service in OPEN else {"client"} if service in CLIENT_ONLY
                    else {"internal"} if service in INTERNAL_ONLY else {"client", "internal"})
        if service in OPEN or name in accepted:
            # Past the token check: the bytes reach the parser, which refuses them.
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (kind, path, name, code, details)
        else:
            assert code == UNAUTHENTICATED, (kind, path, name, code, details)
            assert details.startswith("authorization: "), details
            assert ("no bearer token" in details) == (name == "none"), details
    assert {service_of(rpc) for kind in ("router", "stage", "expert") for rpc in rpcs_of(kind)} >= (
        OPEN | CLIENT_ONLY | INTERNAL_ONLY)
    assert tokens == reference


def test_health_is_open_and_reflects_serving(mesh):
    async def body():
        for addresses in mesh.addresses().values():
            for address in addresses:
                async with grpc.aio.insecure_channel(address) as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING, address

    mesh.run(body())


def test_internal_token_opens_a_stage_and_a_client_token_does_not(mesh):
    async def body():
        async with grpc.aio.insecure_channel(mesh.addresses()["stage"][0]) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            info = await stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=5, metadata=bearer(INTERNAL_TOKEN))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.FreeSequences(stage_pb2.FreeSequencesRequest(sequence_ids=[1]), timeout=5,
                                         metadata=bearer(CLIENT_TOKEN))
            return info, refused.value

    info, refused = mesh.run(body())
    assert info.name == "stage-0"
    assert refused.code() == UNAUTHENTICATED and "shardmesh.v1.Stage" in refused.details()


def test_client_token_cannot_register_a_server(mesh):
    """Registering is how a hostile server would get activations: only the internal token may."""
    request = router_pb2.RegisterServerRequest(name="stage-0", role=router_pb2.SERVER_ROLE_STAGE,
                                               address="127.0.0.1:1", layers=router_pb2.LayerRange(start=0, end=2))

    async def body():
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = router_pb2_grpc.RegistryStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RegisterServer(request, timeout=5, metadata=bearer(CLIENT_TOKEN))
            return refused.value

    assert mesh.run(body()).code() == UNAUTHENTICATED


def test_sdk_sends_its_token(mesh, reference):
    async def body():
        async with AsyncClient(mesh.address, timeout=30, token=CLIENT_TOKEN) as client:
            good = (await client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids
            info = await client.model_info()
        refused = []
        for token in (None, "wrong-token", INTERNAL_TOKEN):
            async with AsyncClient(mesh.address, timeout=30, token=token) as client:
                for call in (client.model_info(), client.generate_all(PROMPT, max_new_tokens=2),
                             client.wait_until_serving(timeout=20)):
                    try:
                        await call
                    except UnauthenticatedError as error:
                        refused.append(error)
        # The synchronous client, from a thread while this loop serves the mesh.
        sync = await asyncio.to_thread(sync_generate, mesh.address, CLIENT_TOKEN)
        with pytest.raises(UnauthenticatedError):
            await asyncio.to_thread(sync_generate, mesh.address, "wrong-token")
        return good, info, refused, sync

    good, info, refused, sync = mesh.run(body())
    assert good == sync == reference and info.vocab_size == 256
    assert len(refused) == 9  # wait_until_serving gives up at once: retrying cannot fix a token


def sync_generate(address: str, token: str) -> list[int]:
    with Client(address, timeout=30, token=token) as client:
        return client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids


def test_sdk_refuses_a_token_it_cannot_send():
    with pytest.raises(ValueError, match="printable ASCII"):
        Client("127.0.0.1:1", token="two words")
    with pytest.raises(ValueError, match="printable ASCII"):
        Client("127.0.0.1:1", token="")


def args(role: str, **given) -> types.SimpleNamespace:
    base = dict(tls_cert=None, tls_key=None, tls_ca=None, internal_token_file=None, no_auth=False)
    if role == "router":
        base["auth_token_file"] = None
    return types.SimpleNamespace(**{**base, **given})


def test_services_refuse_to_start_unprotected(tmp_path, monkeypatch):
    """Off only when explicitly disabled: no token and no --no-auth is an error naming the flags."""
    monkeypatch.delenv("SHARDMESH_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("SHARDMESH_INTERNAL_TOKEN", raising=False)
    client_file, internal_file = tmp_path / "client.token", tmp_path / "internal.token"
    client_file.write_text("abc123\n")
    internal_file.write_text("def456\n")
    with pytest.raises(ValueError, match="--auth-token-file"):
        service_security(args("router"), "router")
    with pytest.raises(ValueError, match="--internal-token-file"):
        service_security(args("router", auth_token_file=client_file), "router")
    with pytest.raises(ValueError, match="--internal-token-file"):
        service_security(args("stage"), "stage")
    with pytest.raises(ValueError, match="contradicts"):
        service_security(args("router", no_auth=True, auth_token_file=client_file), "router")
    router = service_security(args("router", auth_token_file=client_file, internal_token_file=internal_file), "router")
    assert (router.client_token, router.internal_token) == ("abc123", "def456")
    stage = service_security(args("stage", internal_token_file=internal_file), "stage")
    assert (stage.client_token, stage.internal_token) == (None, "def456")
    assert service_security(args("expert", no_auth=True), "expert") == Security()
    monkeypatch.setenv("SHARDMESH_AUTH_TOKEN", "from-env")
    monkeypatch.setenv("SHARDMESH_INTERNAL_TOKEN", "internal-env")
    assert service_security(args("router"), "router").client_token == "from-env"
    assert "from-env" not in repr(service_security(args("router"), "router"))  # secrets stay out of logs


def test_shardmesh_up_hands_out_fresh_tokens(tmp_path):
    """`shardmesh up`'s default: random tokens in owner-only files, the client token to the router
    only; `--no-auth` says so to every service."""
    for name in "abc":
        (tmp_path / name).mkdir()
    first, second = MeshSecrets.create(tmp_path / "a"), MeshSecrets.create(tmp_path / "b")
    for path in (first.client_token_file, first.internal_token_file):
        assert path.stat().st_mode & 0o777 == 0o600
    tokens = {first.client_token, second.client_token, first.internal_token_file.read_text().strip()}
    assert len(tokens) == 3 and all(len(t) >= 32 for t in tokens)
    assert first.service_args("router") == ["--auth-token-file", str(first.client_token_file),
                                            "--internal-token-file", str(first.internal_token_file)]
    assert first.service_args("stage") == ["--internal-token-file", str(first.internal_token_file)]
    assert first.client_token not in " ".join(first.service_args("router"))  # never on a command line
    off = MeshSecrets.create(tmp_path / "c", no_auth=True)
    assert off.service_args("expert") == ["--no-auth"] and off.client_token is None
