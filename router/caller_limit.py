"""CallerLimit: no caller holds more than N sequences at the router (`--max-sequences-per-caller`).

The bounded admission queue (router/admission.py) protects the router; this keeps one caller from
taking every batch slot and queue place from the others. A sequence is held from the moment its
Generate is admitted (queued or running) until its stream ends, however it ends. Past the limit,
the caller's next Generate gets RESOURCE_EXHAUSTED naming `--max-sequences-per-caller`, at once;
the other callers are not affected.

Who a caller is (`--caller-identity`):
  host        the peer's address without its port (default): every connection from one host is
              one caller, so opening more channels does not buy more sequences; behind a proxy or
              on loopback, everything it forwards is one caller.
  connection  the peer's address with its port: one client channel (one SDK Client) is one caller.
  token       the name of the client token the call presented (the router's `--auth-tokens-file`,
              shardmesh/client_tokens.py): one token is one caller wherever it connects from.
A client that presented a TLS certificate (mutual TLS) is its certificate's subject in the host
and connection modes, wherever it connects from. The same identity counts refusals for the
tarpit (router/tarpit.py).
"""

import collections

from shardmesh.errors import ResourceExhausted

IDENTITIES = ("host", "connection", "token")


def caller_of(context, identity: str, tokens=None) -> str:
    """The caller of a call, as `identity` says (see the module docstring); tokens: the router's
    shardmesh.client_tokens.ClientTokens (identity "token" only)."""
    if identity == "token" and tokens is not None:
        name = tokens.caller_name(context.invocation_metadata())
        if name is not None:
            return "token:" + name
    auth = context.auth_context()
    subject = auth.get("x509_common_name") or auth.get("x509_subject")
    if subject:
        return "certificate:" + b",".join(subject).decode(errors="replace")
    peer = context.peer()  # "ipv4:127.0.0.1:5454", "ipv6:[::1]:5454", "unix:/path"
    if identity == "host" and peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


class CallerLimit:
    def __init__(self, limit: int, identity: str = "host", tokens=None):
        """limit: sequences one caller may hold (0 = no limit); identity: one of IDENTITIES; tokens:
        the router's shardmesh.client_tokens.ClientTokens, needed by identity "token"."""
        if limit < 0:
            raise ValueError(f"max_sequences_per_caller {limit} must be >= 0")
        if identity not in IDENTITIES:
            raise ValueError(f"caller identity {identity!r} is not one of {', '.join(IDENTITIES)}")
        if identity == "token" and tokens is None:
            raise ValueError("caller identity 'token' needs client tokens (--auth-tokens-file or --auth-token-file)")
        self.limit, self.identity, self.tokens = limit, identity, tokens
        self.held: collections.Counter[str] = collections.Counter()  # caller -> sequences held now

    def acquire(self, context) -> str | None:
        """Hold one sequence for this call's caller and return the caller (None when unlimited);
        raise ResourceExhausted when it already holds `limit`. Pair with `release`."""
        if not self.limit:
            return None
        caller = caller_of(context, self.identity, self.tokens)
        if self.held[caller] >= self.limit:
            raise ResourceExhausted("caller", f"{caller} already holds {self.limit} sequences at this router "
                                              f"(--max-sequences-per-caller): retry when one of them ends")
        self.held[caller] += 1
        return caller

    def release(self, caller: str | None) -> None:
        if caller is None:
            return
        self.held[caller] -= 1
        if self.held[caller] <= 0:
            del self.held[caller]  # the map holds only callers with sequences: bounded by the queue
