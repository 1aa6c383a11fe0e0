"""What `shardmesh up` (the Launcher) hands the services it starts: by default a fresh random
client token and internal token, each in a file readable by the user only (never on a command
line, where `ps` shows it); `--no-auth` instead, explicitly; and TLS files when given.

Default on: a loopback port is reachable by every local user and process of the machine, and an
unauthenticated inference API on one is how several serving systems were taken over. The token
costs a local user nothing: `shardmesh up` prints the file to pass as `--token-file`."""

import dataclasses
import os
import pathlib
import secrets

from shardmesh.security import Security, bearer_metadata


def write_secret(path: pathlib.Path, text: str) -> pathlib.Path:
    """Write `text` to a new file only its owner can read."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text + "\n")
    return path


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """Mutual TLS among a local mesh's services (one certificate for all, e.g. `shardmesh certs`):
    the CA is required, as services verify each other by it."""
    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path
    # The router's port takes clients with TLS but no certificate (they send the client token);
    # between services TLS stays mutual (`--tls-clients-without-certificates` on the router only).
    clients_without_certificates: bool = False

    def args(self, role: str = "") -> list[str]:
        args = ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]
        return args + (["--tls-clients-without-certificates"] if self.clients_without_certificates
                       and role == "router" else [])


@dataclasses.dataclass(frozen=True)
class MeshSecrets:
    client_token_file: pathlib.Path | None   # None = --no-auth
    internal_token_file: pathlib.Path | None
    tls: TlsFiles | None = None

    @classmethod
    def create(cls, workdir: pathlib.Path, no_auth: bool = False, tls: TlsFiles | None = None) -> "MeshSecrets":
        if no_auth:
            return cls(None, None, tls)
        return cls(write_secret(workdir / "client.token", secrets.token_urlsafe(32)),
                   write_secret(workdir / "internal.token", secrets.token_urlsafe(32)), tls)

    @property
    def client_token(self) -> str | None:
        return self.client_token_file.read_text().strip() if self.client_token_file else None

    def service_args(self, role: str) -> list[str]:
        """Command-line flags of one service of `role` ("router" | "stage" | "expert")."""
        tls = self.tls.args(role) if self.tls else []
        if self.client_token_file is None:
            return [*tls, "--no-auth"]
        tokens = ["--auth-token-file", str(self.client_token_file)] if role == "router" else []
        return [*tls, *tokens, "--internal-token-file", str(self.internal_token_file)]

    def client_security(self) -> Security:
        """How the launcher itself reaches the router: mutual TLS as the services (their certificate),
        no internal token; calls to the Router service carry `client_metadata()`."""
        if self.tls is None:
            return Security()
        return Security.from_files(cert_file=self.tls.cert, key_file=self.tls.key, ca_file=self.tls.ca,
                                   read_environment=False)

    def client_metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.client_token)
