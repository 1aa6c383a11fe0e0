"""Mutual TLS over the real wire, with certificates from `shardmesh certs` (shardmesh.certs): every
service requires a client certificate signed by the mesh's CA and presents its own on every
outgoing call; a peer without one, with one from another CA, or speaking plaintext is refused at
the handshake (UNAVAILABLE), and the mesh keeps generating the right tokens."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh.certs import make_certs
from shardmesh.client import AsyncClient, UnavailableError, client_credentials
from shardmesh.reference import transformers_greedy
from shardmesh.security import Security, bearer_metadata
from shardmesh.v1 import router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc

from wire_helpers import ModuleMesh

CLIENT_TOKEN, INTERNAL_TOKEN = "tls-client-token", "tls-internal-token"
PROMPT, NEW_TOKENS = [1, 9, 27, 81], 6


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Our CA's files, and another CA's (a stranger with certificates of its own)."""
    return make_certs(tmp_path_factory.mktemp("ours")), make_certs(tmp_path_factory.mktemp("theirs"))


def security_from(paths, **tokens) -> Security:
    return Security(tls_cert=paths["service"].read_bytes(), tls_key=paths["service_key"].read_bytes(),
                    tls_ca=paths["ca"].read_bytes(), **tokens)


@pytest.fixture(scope="module")
def mesh(mixtral_dir, pki):
    ours, _ = pki
    running = ModuleMesh.start(mixtral_dir, security=security_from(
        ours, client_token=CLIENT_TOKEN, internal_token=INTERNAL_TOKEN))
    yield running
    running.stop()


def test_certificate_files(pki):
    ours, _ = pki
    from cryptography import x509
    service = x509.load_pem_x509_certificate(ours["service"].read_bytes())
    names = service.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    for key in ("ca_key", "service_key", "client_key"):
        assert ours[key].stat().st_mode & 0o077 == 0, key  # private keys: owner only


def test_client_with_a_certificate_generates(mesh, pki, mixtral_dir):
    ours, _ = pki

    async def body():
        credentials = client_credentials(ours["ca"], ours["client"], ours["client_key"])
        async with AsyncClient(mesh.address, timeout=60, token=CLIENT_TOKEN, credentials=credentials) as client:
            return (await client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids

    # The router reached the stages and the stages the expert servers over mutual TLS to get these.
    assert mesh.run(body()) == transformers_greedy(mixtral_dir, PROMPT, NEW_TOKENS, ignore_eos=True)


def refused_peers(pki) -> dict[str, grpc.ChannelCredentials | None]:
    ours, theirs = pki
    return {
        "plaintext": None,
        "no_client_certificate": client_credentials(ours["ca"]),
        "certificate_of_another_ca": client_credentials(ours["ca"], theirs["client"], theirs["client_key"]),
        "service_certificate_of_another_ca": client_credentials(ours["ca"], theirs["service"], theirs["service_key"]),
        "trusting_another_ca": client_credentials(theirs["ca"], ours["client"], ours["client_key"]),
    }


@pytest.mark.parametrize("peer", ["plaintext", "no_client_certificate", "certificate_of_another_ca",
                                  "service_certificate_of_another_ca", "trusting_another_ca"])
def test_peer_without_a_valid_certificate_is_refused_everywhere(mesh, pki, peer):
    credentials = refused_peers(pki)[peer]
    ours, _ = pki

    async def call(address: str, method):
        channel = (grpc.aio.secure_channel(address, credentials) if credentials
                   else grpc.aio.insecure_channel(address))
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await method(channel)
            return refused.value.code()

    async def body():
        codes = []
        for kind, addresses in mesh.addresses().items():
            for address in addresses:  # health too: the handshake comes before any service
                codes.append(await call(address, lambda ch: health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)))
        codes.append(await call(mesh.address, lambda ch: router_pb2_grpc.RouterStub(ch).GetModelInfo(
            router_pb2.GetModelInfoRequest(), timeout=5, metadata=bearer_metadata(CLIENT_TOKEN))))
        codes.append(await call(mesh.address, lambda ch: router_pb2_grpc.RegistryStub(ch).RegisterServer(
            router_pb2.RegisterServerRequest(name="stage-0"), timeout=5, metadata=bearer_metadata(INTERNAL_TOKEN))))
        codes.append(await call(mesh.addresses()["stage"][0], lambda ch: stage_pb2_grpc.StageStub(ch).GetStageInfo(
            stage_pb2.GetStageInfoRequest(), timeout=5, metadata=bearer_metadata(INTERNAL_TOKEN))))
        # ... and the mesh serves a valid client as before.
        good = client_credentials(ours["ca"], ours["client"], ours["client_key"])
        async with AsyncClient(mesh.address, timeout=60, token=CLIENT_TOKEN, credentials=good) as client:
            await client.wait_until_serving(timeout=10)
        return codes

    codes = mesh.run(body())
    assert codes and set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes


def test_sdk_reports_a_refused_handshake(mesh, pki):
    ours, theirs = pki

    async def body():
        async with AsyncClient(mesh.address, timeout=5, token=CLIENT_TOKEN,
                               credentials=client_credentials(ours["ca"])) as client:
            with pytest.raises(UnavailableError):
                await client.model_info()

    mesh.run(body())


def test_a_valid_certificate_still_needs_the_token(mesh, pki):
    """mTLS and tokens are two locks: the service certificate alone does not open a stage."""
    ours, _ = pki

    async def body():
        credentials = client_credentials(ours["ca"], ours["service"], ours["service_key"])
        async with grpc.aio.secure_channel(mesh.addresses()["stage"][0], credentials) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=5)
            info = await stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=5,
                                           metadata=bearer_metadata(INTERNAL_TOKEN))
            return refused.value.code(), info.name

    assert mesh.run(body()) == (grpc.StatusCode.UNAUTHENTICATED, "stage-0")
