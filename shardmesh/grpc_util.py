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
from shardmesh.security import Security
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
# Servers accept client keepalive pings every 5 s or more.
SERVER_OPTIONS = GRPC_OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 5_000)]

CONTROL_DEADLINE_S = 10.0  # registration, placement, free, info calls


def new_server(security: Security | None = None, max_receive_bytes: int | None = None) -> grpc.aio.Server:
    """A server with our options (`max_receive_bytes` overrides the receive limit) whose calls
    are token-checked as `security` says (see shardmesh.security), then refused with
    INVALID_ARGUMENT when their bytes are not the method's message (see shardmesh.request_guard)."""
    options = [(key, max_receive_bytes if key == "grpc.max_receive_message_length" and max_receive_bytes else value)
               for key, value in SERVER_OPTIONS]
    interceptors = [*(security.server_interceptors() if security else ()), MalformedRequestGuard()]
    return grpc.aio.server(options=options, interceptors=interceptors)


def open_channel(address: str, security: Security | None = None) -> grpc.aio.Channel:
    """A channel to another service: TLS (presenting our certificate under mutual TLS) and the
    internal token when `security` has them, plaintext otherwise."""
    interceptors = (security.channel_interceptors() or None) if security else None
    if security is not None and security.tls:
        return grpc.aio.secure_channel(address, security.channel_credentials(), options=GRPC_OPTIONS,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS, interceptors=interceptors)


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

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float | None = 1.0) -> None:
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


async def wait_for_health(address: str, timeout: float, service: str = "",
                          security: Security | None = None) -> None:
    """Poll grpc.health.v1 on `address` until SERVING; raise TimeoutError after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.02
    async with open_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{address} not SERVING after {timeout:.0f} s")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 2.0))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.5)


async def register_with_router(router_address: str, request: router_pb2.RegisterServerRequest,
                               timeout: float = 120.0,
                               security: Security | None = None) -> router_pb2.RegisterServerResponse:
    """Register this server, retrying while the router is not reachable yet (bounded by `timeout`).

    A refusal (wrong layers, wrong model...) is raised at once: retrying cannot fix it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.05
    async with open_channel(router_address, security) as channel:
        stub = router_pb2_grpc.RegistryStub(channel)
        while True:
            try:
                return await stub.RegisterServer(request, timeout=CONTROL_DEADLINE_S)
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                if loop.time() + delay > deadline:
                    raise TimeoutError(f"router at {router_address} unreachable for {timeout:.0f} s "
                                       f"(last: {error.details()}; a TLS mismatch looks like this too)") from error
                log.info("router %s not reachable yet (%s); retrying", router_address, error.code().name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
