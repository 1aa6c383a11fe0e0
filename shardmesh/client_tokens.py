"""Named client tokens: several bearer tokens open the public Router service, each with a name.

A tokens file (the router's `--auth-tokens-file`) holds one `NAME TOKEN` pair a line; blank lines
and lines starting with `#` are skipped:

    # name      token
    alice       3f9c0d...
    batch-jobs  77ab01...

Names are letters, digits and `_.@-` (at most 64); names and tokens are unique. The router's
single `--auth-token-file` token, when also given, is named `default`. A presented token is
hashed (SHA-256) and compared with every stored hash in constant time, without an early exit, so
neither a token nor how many characters of one match can be timed; the name it matched is the
caller's identity for `--caller-identity token` (router/caller_limit.py: per-caller limits and the
tarpit then count per token, wherever its holder connects from).
Needs the standard library only.
"""

import hashlib
import hmac
import os
import pathlib
import re

DEFAULT_NAME = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_BEARER = b"Bearer "


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class ClientTokens:
    """name -> token, kept as SHA-256 digests only."""

    def __init__(self, tokens: dict[str, str]):
        from shardmesh.security import check_token
        if not tokens:
            raise ValueError("no client tokens given")
        seen: set[bytes] = set()
        self._digests: list[tuple[str, bytes]] = []
        for name, token in tokens.items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"client token name {name!r} is not 1-64 letters, digits and _.@- "
                                 "(starting with a letter or digit)")
            digest = _digest(check_token(token, f"client token {name!r}").encode())
            if digest in seen:
                raise ValueError(f"client token {name!r} is the same token as another name's")
            seen.add(digest)
            self._digests.append((name, digest))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._digests]

    def __repr__(self) -> str:  # never the digests
        return f"ClientTokens({', '.join(self.names)})"

    @classmethod
    def from_file(cls, path: str | os.PathLike, default_token: str | None = None) -> "ClientTokens":
        """Read a tokens file (see the module docstring); `default_token` joins as `default`."""
        tokens: dict[str, str] = {}
        if default_token is not None:
            tokens[DEFAULT_NAME] = default_token
        for number, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected `NAME TOKEN`, got {len(fields)} fields")
            name, token = fields
            if name in tokens:
                raise ValueError(f"{path}:{number}: client token name {name!r} appears twice")
            tokens[name] = token
        return cls(tokens)

    def name_of(self, authorization: str | bytes) -> str | None:
        """The name of the token in an `authorization: Bearer <token>` value, None if none matches.
        Every stored digest is compared, in constant time."""
        raw = authorization.encode() if isinstance(authorization, str) else bytes(authorization)
        presented = _digest(raw[len(_BEARER):]) if raw.startswith(_BEARER) else b""
        matched = None
        for name, digest in self._digests:
            if hmac.compare_digest(presented, digest) and matched is None:
                matched = name
        return matched

    def caller_name(self, metadata) -> str | None:
        """The token name of a call's invocation metadata ((key, value) pairs), None without one."""
        for key, value in metadata or ():
            if key == "authorization":
                name = self.name_of(value)
                if name is not None:
                    return name
        return None
