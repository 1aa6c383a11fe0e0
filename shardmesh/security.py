"""Who may call what: bearer tokens and TLS / mutual TLS, configured once per process (`Security`)
and applied by `shardmesh.grpc_util` to every server it creates and every channel it opens.

Tokens (metadata `authorization: Bearer <token>`, compared in constant time):
  client token    the public Router service (Generate, GetModelInfo, GetClusterStatus); or
                  several named ones from a tokens file (shardmesh/client_tokens.py).
  internal token  Registry (on the router's port), Stage and Expert services; every outgoing
                  call between services sends it. A client token never opens an internal service.
grpc.health.v1 is open to all (orchestrators and `shardmesh up` probe it without secrets);
reflection, and anything else, takes either token. A service whose token is not configured is
not token-checked: it is then protected by mutual TLS, or explicitly opened with `--no-auth`.

TLS: cert + key make every server speak TLS. A CA makes it mutual: servers require a client
certificate signed by that CA, and outgoing channels present their own and trust only that CA.
`--tls-clients-without-certificates` (typically on the router only) keeps the encryption and the
CA for outgoing calls but lets peers of that port connect without a certificate: public clients
then authenticate with the bearer token alone, while the other services' ports stay mutual TLS.
A failed handshake is reported at once, naming TLS (`HandshakeWatch`), not retried to a deadline.
Needs grpcio and the standard library only (the client SDK and `shardmesh generate` use it).
"""

import argparse
import dataclasses
import os
import pathlib

import grpc

from shardmesh.client_tokens import DEFAULT_NAME, ClientTokens
from shardmesh.token_interceptors import (  # noqa: F401  (bearer_metadata and the service sets: re-exported)
    CLIENT_SERVICES, INTERNAL_SERVICES, OPEN_SERVICES, BearerTokenInterceptor, bearer_metadata, token_interceptors,
)

CLIENT_TOKEN_ENV = "SHARDMESH_AUTH_TOKEN"
INTERNAL_TOKEN_ENV = "SHARDMESH_INTERNAL_TOKEN"


# What a failed TLS handshake looks like to the side that connects. When it refuses the server
# (a certificate it does not trust, or a plaintext server) grpc says so in the details; when the
# server refuses it (no client certificate, one from another CA, plaintext to a TLS port) grpc
# only reports the connection closed at once, which a peer that is merely down never does (that
# is "Connection refused"): CLOSED_AT_ONCE_LIMIT such closes in a row count as a refusal.
_HANDSHAKE_MARKERS = ("handshake failed", "ssl_error", "certificate_verify_failed", "wrong_version_number")
CLOSED_AT_ONCE_LIMIT = 3
TLS_HINT = ("check that both sides agree on TLS and trust each other's certificates (--tls-ca, --tls-cert, "
            "--tls-key; under mutual TLS the connecting side needs a certificate signed by the server's CA)")


class HandshakeWatch:
    """Tells, from the UNAVAILABLE details of successive attempts to reach one peer, when a TLS
    handshake has failed for good (see above); `failure(details)` returns why, else None."""

    def __init__(self):
        self.closed_at_once = 0

    def failure(self, details: str) -> str | None:
        text = (details or "").lower()
        if any(marker in text for marker in _HANDSHAKE_MARKERS):
            return f"TLS handshake failed: {details}; {TLS_HINT}"
        self.closed_at_once = self.closed_at_once + 1 if "socket closed" in text else 0
        if self.closed_at_once >= CLOSED_AT_ONCE_LIMIT:
            return (f"the server closed the connection during the TLS handshake {self.closed_at_once} times in a row "
                    f"(it refuses this side's certificate, or the lack of one, or plaintext): {TLS_HINT}")
        return None


def check_token(token: str, source: str) -> str:
    """A token must be non-empty printable ASCII without spaces (it travels as HTTP/2 metadata)."""
    token = token.strip()
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(f"the token from {source} is empty or not printable ASCII without spaces")
    return token


def read_token(file: str | os.PathLike | None, env: str) -> str | None:
    """The token in `file`, else in the environment variable `env`, else None."""
    if file is not None:
        return check_token(pathlib.Path(file).read_text(), str(file))
    if os.environ.get(env):
        return check_token(os.environ[env], f"${env}")
    return None


@dataclasses.dataclass(frozen=True)
class Security:
    """One process's secrets; the default (all None) is no TLS and no token checks."""

    client_token: str | None = dataclasses.field(default=None, repr=False)
    # Named client tokens (a tokens file); client_token, when also set, is one of them ("default").
    client_tokens: ClientTokens | None = dataclasses.field(default=None, repr=False)
    internal_token: str | None = dataclasses.field(default=None, repr=False)
    tls_cert: bytes | None = dataclasses.field(default=None, repr=False)  # PEM chain of this process
    tls_key: bytes | None = dataclasses.field(default=None, repr=False)   # PEM private key
    tls_ca: bytes | None = dataclasses.field(default=None, repr=False)    # PEM CA: mutual TLS
    # With a CA: False lets clients of this process's port connect without a certificate (server
    # TLS only; they authenticate with a bearer token). Outgoing calls still present ours.
    require_client_certificates: bool = True

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("mutual TLS (--tls-ca) needs this service's own --tls-cert and --tls-key")

    @classmethod
    def from_files(cls, *, client_token_file=None, internal_token_file=None, cert_file=None, key_file=None,
                   ca_file=None, read_environment: bool = True, client_tokens_file=None) -> "Security":
        """Read token files (falling back to $SHARDMESH_AUTH_TOKEN / $SHARDMESH_INTERNAL_TOKEN), the
        named client tokens file (shardmesh/client_tokens.py) and PEM files."""
        read = lambda path: pathlib.Path(path).read_bytes() if path is not None else None  # noqa: E731
        token = lambda path, env: read_token(path, env) if read_environment or path else None  # noqa: E731
        client_token = token(client_token_file, CLIENT_TOKEN_ENV)
        return cls(client_token=client_token,
                   client_tokens=ClientTokens.from_file(client_tokens_file, client_token) if client_tokens_file else None,
                   internal_token=token(internal_token_file, INTERNAL_TOKEN_ENV),
                   tls_cert=read(cert_file), tls_key=read(key_file), tls_ca=read(ca_file))

    @property
    def accepted_client_tokens(self) -> ClientTokens | None:
        """Every client token this process accepts, by name (None: clients are not token-checked)."""
        if self.client_tokens is not None:
            return self.client_tokens
        return ClientTokens({DEFAULT_NAME: self.client_token}) if self.client_token else None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def mutual_tls(self) -> bool:
        return self.tls_ca is not None

    @property
    def requires_peer_certificates(self) -> bool:
        """Whether this process's port refuses a peer without a certificate signed by the CA."""
        return self.mutual_tls and self.require_client_certificates

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)], root_certificates=self.tls_ca,
                                           require_client_auth=self.requires_peer_certificates)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Trust the CA (system roots without one); present our certificate when TLS is mutual."""
        if self.mutual_tls:
            return grpc.ssl_channel_credentials(self.tls_ca, self.tls_key, self.tls_cert)
        return grpc.ssl_channel_credentials()

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.accepted_client_tokens is None and self.internal_token is None:
            return []
        return [BearerTokenInterceptor(self.accepted_client_tokens, self.internal_token)]

    def channel_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Outgoing calls between services carry the internal token."""
        return token_interceptors(self.internal_token) if self.internal_token else []


def add_tls_arguments(parser: argparse.ArgumentParser, client: bool = False) -> None:
    parser.add_argument("--tls-cert", type=pathlib.Path, metavar="PEM",
                        help="client certificate, for a router requiring mutual TLS" if client
                        else "certificate chain: serve TLS")
    parser.add_argument("--tls-key", type=pathlib.Path, metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-ca", type=pathlib.Path, metavar="PEM",
                        help="CA to trust: connect with TLS" if client
                        else "CA: mutual TLS (require and present certificates signed by it)")
    if not client:
        parser.add_argument("--tls-clients-without-certificates", action="store_true",
                            help="with --tls-ca: peers of this port may connect with TLS but no certificate "
                                 "(they authenticate with their bearer token); outgoing calls still present "
                                 "this service's certificate. Needs the internal token.")


def add_service_security_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    """Flags of `shardmesh router|stage|expert`; see `service_security`."""
    add_tls_arguments(parser)
    if role == "router":
        parser.add_argument("--auth-token-file", type=pathlib.Path, metavar="FILE",
                            help=f"bearer token clients must send (else ${CLIENT_TOKEN_ENV})")
        parser.add_argument("--auth-tokens-file", type=pathlib.Path, metavar="FILE",
                            help="named client tokens, one `NAME TOKEN` a line: any of them opens the client API "
                                 "and its name is the caller for --caller-identity token (with --auth-token-file, "
                                 "that one is named `default`; shardmesh/client_tokens.py)")
    parser.add_argument("--internal-token-file", type=pathlib.Path, metavar="FILE",
                        help=f"bearer token between services (else ${INTERNAL_TOKEN_ENV})")
    parser.add_argument("--no-auth", action="store_true",
                        help="no token checks at all: for local use on a trusted machine only")


def service_security(args: argparse.Namespace, role: str) -> Security:
    """Security of one service from its flags: tokens are required unless --no-auth says otherwise.

    The router needs a client token; every service needs its internal ports protected by an
    internal token or mutual TLS (else anyone reaching a port could register or feed a stage)."""
    client_file = getattr(args, "auth_token_file", None)
    client_tokens_file = getattr(args, "auth_tokens_file", None)
    without_certificates = getattr(args, "tls_clients_without_certificates", False)
    if without_certificates and args.tls_ca is None:
        raise ValueError("--tls-clients-without-certificates needs --tls-ca (without it no certificate is asked anyway)")
    if args.no_auth:
        if without_certificates:
            raise ValueError("--tls-clients-without-certificates needs tokens: it contradicts --no-auth")
        if client_file or client_tokens_file or args.internal_token_file:
            raise ValueError("--no-auth contradicts a token file")
        return Security.from_files(cert_file=args.tls_cert, key_file=args.tls_key, ca_file=args.tls_ca,
                                   read_environment=False)
    security = Security.from_files(client_token_file=client_file, internal_token_file=args.internal_token_file,
                                   cert_file=args.tls_cert, key_file=args.tls_key, ca_file=args.tls_ca,
                                   client_tokens_file=client_tokens_file)
    if role == "router" and security.accepted_client_tokens is None:
        raise ValueError(f"the router needs a client token: --auth-token-file FILE, --auth-tokens-file FILE or "
                         f"${CLIENT_TOKEN_ENV} (or --no-auth, for local use only)")
    if role != "router":
        security = dataclasses.replace(security, client_token=None, client_tokens=None)  # never sent nor accepted here
    security = dataclasses.replace(security, require_client_certificates=not without_certificates)
    if security.internal_token is None and not security.requires_peer_certificates:
        raise ValueError(f"internal services need --internal-token-file FILE, ${INTERNAL_TOKEN_ENV} or mutual "
                         "TLS (--tls-ca) (or --no-auth, for local use only)")
    return security


def client_credentials(ca_file=None, cert_file=None, key_file=None) -> grpc.ChannelCredentials:
    """TLS credentials of a client: trust `ca_file` (else the system's roots); present cert + key
    when the router requires mutual TLS."""
    read = lambda path: pathlib.Path(path).read_bytes() if path is not None else None  # noqa: E731
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key (--tls-cert with --tls-key)")
    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))
