"""The address a stage or expert server registers with the router (`--advertise`), and the
replica id of a scaled expert server (`--replica-id`).

A server binds one address (`--host`, loopback by default) but must register one that the
router and the stages can reach: binding 0.0.0.0 in a container and registering "0.0.0.0:PORT"
would send every peer to itself. Two placeholders are expanded when the server starts, for
replicas of one container spec that cannot name themselves in advance (`docker compose up
--scale`): `{hostname}` is this machine's host name (a container's id in Docker) and `{ip}` the
address that name resolves to (the container's address on its network)."""

import logging
import socket

log = logging.getLogger(__name__)
WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}


def expand(text: str) -> str:
    """Replace {hostname} and {ip} in `text` (ValueError naming the placeholder when {ip} does not resolve)."""
    if "{hostname}" in text:
        text = text.replace("{hostname}", socket.gethostname())
    if "{ip}" in text:
        try:
            text = text.replace("{ip}", socket.gethostbyname(socket.gethostname()))
        except OSError as error:
            raise ValueError(f"advertise: {{ip}}: host name {socket.gethostname()!r} "
                             f"does not resolve ({error})") from None
    return text


def split_host_port(address: str) -> tuple[str, int | None]:
    """"host", "host:port", "[v6]" or "[v6]:port" -> (host, port or None); ValueError naming what is wrong."""
    if address.startswith("["):
        host, bracket, rest = address.partition("]")
        host += bracket
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"advertise: {address!r} is not [IPv6] or [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
    elif ":" in address:
        raise ValueError(f"advertise: {address!r}: write an IPv6 address in brackets, [addr]:PORT")
    else:
        host, port_text = address, None
    if not host or host in WILDCARD_HOSTS:
        raise ValueError(f"advertise: {address!r} names no host that peers can reach")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"advertise: port {port_text!r} of {address!r} is not in [1, 65535]")
    return host, int(port_text)


def check(advertise: str) -> str:
    """`advertise` with placeholders expanded, validated ("" stays "": the bound address)."""
    if not advertise:
        return ""
    expanded = expand(advertise)
    split_host_port(expanded)
    return expanded


def advertised_address(advertise: str, host: str, bound_port: int) -> str:
    """What to register: `advertise` (its port defaulting to the bound one), else host:bound_port."""
    if not advertise:
        if host in WILDCARD_HOSTS:
            log.warning("bound to %r without --advertise: registering %s:%d, which only this host can reach",
                        host, host, bound_port)
        return f"{host}:{bound_port}"
    advertised_host, port = split_host_port(advertise)
    return f"{advertised_host}:{port or bound_port}"
