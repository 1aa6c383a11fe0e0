"""TLS without client certificates on the router's port (public clients bring a bearer token, no
certificate) alongside mutual TLS between services; and a peer whose TLS does not match failing
fast with an error naming TLS (registration, health waits, the SDK, a service process), instead
of retrying until a deadline (120 s for registration)."""

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh import grpc_util
from shardmesh.certs import make_certs
from shardmesh.client import AsyncClient, UnauthenticatedError, UnavailableError, client_credentials
from shardmesh.reference import transformers_greedy
from shardmesh.security import Security, bearer_metadata
from shardmesh.service_config import ServiceConfig
from shardmesh.v1 import router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc

from wire_helpers import ModuleMesh

CLIENT_TOKEN, INTERNAL_TOKEN = "modes-client-token", "modes-internal-token"
PROMPT, NEW_TOKENS = [1, 9, 27, 81], 6
# A refused handshake is reported after 3 closes in a row (~0.4 s of backoff) or at once; the
# bound leaves room for a 2-core machine at a load average of 10 (seen: under 1.5 s there).
FAIL_FAST_S = 8.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("ours")), make_certs(tmp_path_factory.mktemp("theirs"))


def service_security(paths, **more) -> Security:
    return Security(tls_cert=paths["service"].read_bytes(), tls_key=paths["service_key"].read_bytes(),
                    tls_ca=paths["ca"].read_bytes(), internal_token=INTERNAL_TOKEN, **more)


async def start_mixed_mesh(model_dir, ours):
    """local_mesh's services, but the router's port takes clients without certificates."""
    from shardmesh import local_mesh
    from expert_server.main import start_expert_server
    from router.main import start_router
    from stage_server.main import start_stage_server
    mutual = service_security(ours)
    base = ServiceConfig(model_dir=model_dir, security=mutual)
    router = await start_router(dataclasses.replace(base, security=dataclasses.replace(
        mutual, client_token=CLIENT_TOKEN, require_client_certificates=False)))
    address = f"127.0.0.1:{router.port}"
    mesh = local_mesh.LocalMesh(router, [], [])

    def config(name):
        return dataclasses.replace(base, name=name, router_address=address)
    for spec in base.topology.stages:
        mesh.stages.append(await start_stage_server(config(spec.name)))
    for spec in base.topology.expert_servers:
        mesh.experts.append(await start_expert_server(config(spec.name)))
    await grpc_util.wait_for_health(address, 60, security=mutual)
    return mesh


@pytest.fixture(scope="module")
def mesh(mixtral_dir, pki):
    loop = asyncio.new_event_loop()
    running = ModuleMesh(loop, loop.run_until_complete(start_mixed_mesh(mixtral_dir, pki[0])))
    yield running
    running.stop()


def test_client_without_a_certificate_generates_with_the_token(mesh, pki, mixtral_dir):
    ours, _ = pki

    async def body():
        credentials = client_credentials(ours["ca"])  # trusts the CA, presents nothing
        async with AsyncClient(mesh.address, timeout=60, token=CLIENT_TOKEN, credentials=credentials) as client:
            tokens = (await client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids
        async with AsyncClient(mesh.address, timeout=10, credentials=credentials) as client:
            with pytest.raises(UnauthenticatedError):
                await client.model_info()
        return tokens

    # The router reached the stages, and they the expert servers, over mutual TLS to get these.
    assert mesh.run(body()) == transformers_greedy(mixtral_dir, PROMPT, NEW_TOKENS, ignore_eos=True)


def test_internal_ports_still_require_certificates(mesh, pki):
    ours, _ = pki

    async def body():
        credentials = client_credentials(ours["ca"])
        async with grpc.aio.secure_channel(mesh.addresses()["stage"][0], credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stage_pb2_grpc.StageStub(channel).GetStageInfo(
                    stage_pb2.GetStageInfoRequest(), timeout=5, metadata=bearer_metadata(INTERNAL_TOKEN))
        async with grpc.aio.secure_channel(mesh.address, credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as registry:  # a client token does not open it
                await router_pb2_grpc.RegistryStub(channel).RegisterServer(
                    router_pb2.RegisterServerRequest(name="stage-0"), timeout=5, metadata=bearer_metadata(CLIENT_TOKEN))
        return refused.value.code(), registry.value.code()

    assert mesh.run(body()) == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def mismatches(pki) -> dict[str, Security]:
    """Securities of a would-be service that cannot talk to the mesh's mutual-TLS ports."""
    ours, theirs = pki
    return {
        "plaintext": Security(internal_token=INTERNAL_TOKEN),  # the server closes the connection
        "certificate_of_another_ca": dataclasses.replace(service_security(theirs), tls_ca=ours["ca"].read_bytes()),
        "trusting_another_ca": dataclasses.replace(service_security(ours), tls_ca=theirs["ca"].read_bytes()),
    }


@pytest.mark.parametrize("peer", ["plaintext", "certificate_of_another_ca", "trusting_another_ca"])
def test_health_wait_fails_fast_naming_tls(mesh, pki, peer):
    security = mismatches(pki)[peer]

    async def body():
        start = time.monotonic()
        with pytest.raises(grpc_util.TLSHandshakeError) as failed:
            await grpc_util.wait_for_health(mesh.addresses()["stage"][0], timeout=60, security=security)
        return time.monotonic() - start, str(failed.value)

    took, message = mesh.run(body())
    assert took < FAIL_FAST_S and "TLS" in message, (took, message)


def test_registration_fails_fast_naming_tls(mesh, pki):
    """register_with_router used to retry a refused handshake for its whole 120 s."""
    security = mismatches(pki)["certificate_of_another_ca"]

    async def body():
        start = time.monotonic()
        with pytest.raises(grpc_util.TLSHandshakeError) as failed:
            await grpc_util.register_with_router(mesh.addresses()["stage"][0], router_pb2.RegisterServerRequest(),
                                                 timeout=120, security=security)
        return time.monotonic() - start, str(failed.value)

    took, message = mesh.run(body())
    assert took < FAIL_FAST_S and "TLS" in message, (took, message)


def test_plaintext_client_to_a_tls_router_fails_fast(mesh, pki):
    async def body():
        start = time.monotonic()
        async with AsyncClient(mesh.address, timeout=60, token=CLIENT_TOKEN) as client:
            with pytest.raises(UnavailableError) as failed:
                await client.wait_until_serving(timeout=60)
        return time.monotonic() - start, str(failed.value)

    took, message = mesh.run(body())
    assert took < FAIL_FAST_S and "TLS" in message, (took, message)


def test_tls_client_to_a_plaintext_server_fails_fast(tmp_path, pki):
    """The other way round: grpc says outright that the handshake failed."""
    ours, _ = pki

    async def body():
        server = grpc_util.new_server()
        health = grpc_util.add_health_and_reflection(server, [])
        await grpc_util.set_serving(health, [], True)
        port = grpc_util.bind(server, "127.0.0.1", 0)
        await server.start()
        try:
            start = time.monotonic()
            with pytest.raises(grpc_util.TLSHandshakeError) as failed:
                await grpc_util.wait_for_health(f"127.0.0.1:{port}", timeout=60, security=service_security(ours))
            return time.monotonic() - start, str(failed.value)
        finally:
            await server.stop(None)

    took, message = asyncio.run(body())
    assert took < FAIL_FAST_S and "TLS handshake failed" in message, (took, message)


def test_service_process_with_a_wrong_certificate_exits_fast(mesh, pki, mixtral_dir):
    """`shardmesh expert` that does not trust the router's certificate exits 2 naming TLS, quickly
    (it used to retry its registration for 120 s). (A certificate the router does not trust would
    be let in here: this router's port takes peers without certificates, by the token.)"""
    ours, theirs = pki
    command = [sys.executable, "-m", "shardmesh.cli", "expert", "--model", str(mixtral_dir), "--name", "experts-a",
               "--router", mesh.address, "--port", "0", "--tls-cert", str(ours["service"]),
               "--tls-key", str(ours["service_key"]), "--tls-ca", str(theirs["ca"])]

    async def run():  # on the mesh's loop, so that the router answers meanwhile
        start = time.monotonic()
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT,
                                                       env={**os.environ, "SHARDMESH_INTERNAL_TOKEN": INTERNAL_TOKEN})
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 60)
        except asyncio.TimeoutError:
            process.kill()
            output, _ = await process.communicate()
            pytest.fail(f"still running after 60 s: {output.decode()[-3000:]}")
        return process.returncode, output.decode(), time.monotonic() - start

    returncode, output, took = mesh.run(run(), timeout=90)
    done = subprocess.CompletedProcess(command, returncode, output, output)
    assert done.returncode == 2 and "TLS" in done.stderr, (done.returncode, done.stderr[-2000:])
    # Process start (torch import, loading experts) takes ~5-10 s here; the handshake part adds < 2 s.
    assert took < 60, took


def test_health_check_over_the_mixed_router_port(mesh, pki):
    """grpc.health.v1 answers a TLS client without a certificate on the router's port."""
    ours, _ = pki

    async def body():
        async with grpc.aio.secure_channel(mesh.address, client_credentials(ours["ca"])) as channel:
            return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status

    assert mesh.run(body()) == health_pb2.HealthCheckResponse.SERVING


def test_clients_without_certificates_flag(pki, tmp_path, monkeypatch):
    """The flag needs a CA and tokens: a port that takes peers without certificates is protected
    by the internal token, never by nothing."""
    import types
    from shardmesh.security import service_security
    monkeypatch.delenv("SHARDMESH_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("SHARDMESH_INTERNAL_TOKEN", raising=False)
    ours, _ = pki
    client_file, internal_file = tmp_path / "client.token", tmp_path / "internal.token"
    client_file.write_text("abc123\n")
    internal_file.write_text("def456\n")
    tls = dict(tls_cert=ours["service"], tls_key=ours["service_key"], tls_ca=ours["ca"])

    def args(**given):
        return types.SimpleNamespace(**{**dict(tls_cert=None, tls_key=None, tls_ca=None, internal_token_file=None,
                                               no_auth=False, auth_token_file=client_file,
                                               tls_clients_without_certificates=True), **given})
    router = service_security(args(internal_token_file=internal_file, **tls), "router")
    assert router.mutual_tls and not router.requires_peer_certificates and router.internal_token == "def456"
    with pytest.raises(ValueError, match="--internal-token-file"):  # mutual TLS no longer guards the Registry
        service_security(args(**tls), "router")
    with pytest.raises(ValueError, match="needs --tls-ca"):
        service_security(args(internal_token_file=internal_file), "router")
    with pytest.raises(ValueError, match="contradicts --no-auth"):
        service_security(args(no_auth=True, auth_token_file=None, **tls), "router")
    mutual = service_security(args(tls_clients_without_certificates=False, **tls), "router")
    assert mutual.requires_peer_certificates and mutual.internal_token is None
