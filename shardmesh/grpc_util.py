"""What every shardmesh service shares on the gRPC side: message limits, health, reflection,
error translation, and registration with the router. Servicers stay thin: they decode, call core
code, and map `shardmesh.errors.RequestError` to a status naming the field."""

import asyncio
import functools
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from shardmesh.errors import RequestError
from shardmesh.request_guard import MalformedRequestGuard
from shardmesh.security import HandshakeWatch, Security
from shardmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

# Set deliberately on both sides: activations of a long prefill are large, and a too-small
# default (4 MiB) would fail them; anything beyond this is refused before it is allocated.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
# Servers accept client keepalive pings every 0.5 s or more (stage -> expert channels ping every
# second, to find a frozen peer fast: stage_server/remote_experts.py FAST_FAILURE_OPTIONS).
SERVER_OPTIONS = GRPC_OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 500)]

CONTROL_DEADLINE_S = 10.0  # registration, placement, free, info calls


def new_server(security: Security | None = None, max_receive_bytes: int | None = None,
               interceptors=()) -> grpc.aio.Server:
    """A server with our options (`max_receive_bytes` overrides the receive limit) whose calls
    are token-checked as `security` says (see shardmesh.security), then go through `interceptors`
    (e.g. router.admission's gate), then are refused with INVALID_ARGUMENT when their bytes are
    not the method's message (see shardmesh.request_guard)."""
    options = [(key, max_receive_bytes if key == "grpc.max_receive_message_length" and max_receive_bytes else value)
               for key, value in SERVER_OPTIONS]
    interceptors = [*(security.server_interceptors() if security else ()), *interceptors, MalformedRequestGuard()]
    return grpc.aio.server(options=options, interceptors=interceptors)


def open_channel(address: str, security: Security | None = None,
                 options: dict[str, int] | None = None) -> grpc.aio.Channel:
    """A channel to another service: TLS (presenting our certificate under mutual TLS) and the
    internal token when `security` has them, plaintext otherwise. `options` override or add to
    GRPC_OPTIONS (e.g. keepalive and reconnect backoff of a channel that must notice a dead peer fast)."""
    interceptors = (security.channel_interceptors() or None) if security else None
    merged = list({**dict(GRPC_OPTIONS), **(options or {})}.items())
    if security is not None and security.tls:
        return grpc.aio.secure_channel(address, security.channel_credentials(), options=merged,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=merged, interceptors=interceptors)


def insecure_channel(address: str) -> grpc.aio.Channel:
    return open_channel(address)


def bind(server: grpc.aio.Server, host: str, port: int, security: Security | None = None) -> int:
    """Bind host:port (0 = let the OS choose), with TLS when `security` has it; return the bound port."""
    if security is not None and security.tls:
        bound = server.add_secure_port(f"{host}:{port}", security.server_credentials())
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return bound


def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> health_aio.HealthServicer:
    """Serve grpc.health.v1 (every service NOT_SERVING until the caller says otherwise) and reflection."""
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    return health


async def set_serving(health: health_aio.HealthServicer, service_names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health.set(name, status)


class RunningServer:
    """A started grpc.aio server, what it serves and how to stop it."""

    def __init__(self, server: grpc.aio.Server, host: str, port: int, servicer, health, on_stop=None):
        self.server, self.host, self.port, self.servicer, self.health = server, host, port, servicer, health
        self._on_stop = on_stop
        self._first_on_stop = []  # on_stop_first

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def on_stop_first(self, callback) -> None:
        """Run `callback()` (a coroutine function) first when stopping, before the server stops."""
        self._first_on_stop.append(callback)

    async def stop(self, grace: float | None = 1.0) -> None:
        for callback in self._first_on_stop:
            await callback()
        await self.server.stop(grace)
        if self._on_stop is not None:
            await self._on_stop()


async def start_server(servicer, add_to_server, service_name: str, host: str, port: int,
                       serving: bool = True, on_stop=None, security: Security | None = None,
                       extra_services=()) -> RunningServer:
    """Serve `servicer` (plus health and reflection) on host:port (0 = the OS chooses).
    extra_services: more (servicer, add_to_server, service_name) on the same port."""
    server = new_server(security)
    add_to_server(servicer, server)
    for extra, add_extra, _ in extra_services:
        add_extra(extra, server)
    names = [service_name, *(name for _, _, name in extra_services)]
    health = add_health_and_reflection(server, names)
    await set_serving(health, names, serving)
    bound = bind(server, host, port, security)
    await server.start()
    return RunningServer(server, host, bound, servicer, health, on_stop)


async def abort_for(context: grpc.aio.ServicerContext, error: RequestError):
    await context.abort(getattr(grpc.StatusCode, error.code), str(error))


def translate_errors(method):
    """Unary methods: a RequestError raised by core code becomes a status naming its field."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except RequestError as error:
            await abort_for(context, error)

    return wrapper


class TLSHandshakeError(ConnectionError):
    """A peer and this process cannot agree on TLS (certificates, CA, or TLS on one side only):
    retrying cannot help, so it is raised at once instead of waiting out a deadline."""


async def retry_until(attempt, timeout: float, first_delay: float, max_delay: float, timeout_error,
                      peer: str = "the peer"):
    """Call `attempt(remaining_s)` until it returns something other than None, sleeping between
    tries with exponential backoff (first_delay doubling up to max_delay). A gRPC error UNAVAILABLE
    or DEADLINE_EXCEEDED (the peer is not there yet) counts as None; any other is raised at once,
    and so is a failed TLS handshake with `peer` (TLSHandshakeError, within a second or so).
    After `timeout` s raises `timeout_error(last_error)` (last_error: the last such gRPC error or None)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay, last_error = first_delay, None
    handshake = HandshakeWatch()
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise timeout_error(last_error)
        try:
            result = await attempt(remaining)
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            why = handshake.failure(error.details()) if error.code() == grpc.StatusCode.UNAVAILABLE else None
            if why is not None:
                raise TLSHandshakeError(f"{peer}: {why}") from error
            result, last_error = None, error
        if result is not None:
            return result
        if loop.time() + delay > deadline:
            raise timeout_error(last_error)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)


async def wait_for_health(address: str, timeout: float, service: str = "",
                          security: Security | None = None) -> None:
    """Poll grpc.health.v1 on `address` until SERVING; raise TimeoutError after `timeout` s."""
    async with open_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving(remaining: float) -> bool | None:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 2.0))
            return True if reply.status == health_pb2.HealthCheckResponse.SERVING else None

        await retry_until(serving, timeout, 0.02, 0.5,
                          lambda error: TimeoutError(f"{address} not SERVING after {timeout:.0f} s"), peer=address)


async def register_with_router(router_address: str, request: router_pb2.RegisterServerRequest,
                               timeout: float = 120.0,
                               security: Security | None = None) -> router_pb2.RegisterServerResponse:
    """Register this server, retrying while the router is not reachable yet (bounded by `timeout`).

    A refusal (wrong layers, wrong model...) is raised at once: retrying cannot fix it."""
    async with open_channel(router_address, security) as channel:
        stub = router_pb2_grpc.RegistryStub(channel)
        tries = 0

        async def register(remaining: float) -> router_pb2.RegisterServerResponse:
            nonlocal tries
            if tries:
                log.info("router %s not reachable yet; retrying", router_address)
            tries += 1
            return await stub.RegisterServer(request, timeout=CONTROL_DEADLINE_S)

        def unreachable(error: grpc.aio.AioRpcError | None) -> TimeoutError:
            last = error.details() if error is not None else "no answer"
            return TimeoutError(f"router at {router_address} unreachable for {timeout:.0f} s "
                                f"(last: {last})")

        return await retry_until(register, timeout, 0.05, 1.0, unreachable, peer=f"router at {router_address}")

