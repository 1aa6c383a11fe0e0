"""The shardmesh client SDK: talk to a mesh's router with grpcio and protobuf alone (no torch).

    from shardmesh.client import Client

    with Client("127.0.0.1:50051", timeout=60) as client:
        client.wait_until_serving(timeout=30)
        for token in client.generate([1, 15043, 3186], max_new_tokens=8):
            print(token.token_id, token.text, token.finish_reason)

`AsyncClient` is the same over grpc.aio (`async with`, `async for`). Every failure surfaces as a
`ShardmeshError` subclass (see `shardmesh.client_errors`). Leaving a stream early (break, `close()`,
the end of a `with` block) cancels the call, so the router frees the sequence at once.
"""

import asyncio
import time
from collections.abc import Sequence

import grpc

from shardmesh.client_errors import (  # noqa: F401  (re-exported: the SDK's public names)
    CancelledError, DeadlineExceededError, FailedPreconditionError, InvalidArgumentError, NotFoundError,
    ResourceExhaustedError, ShardmeshError, UnauthenticatedError, UnavailableError, from_rpc_error,
)
from shardmesh.client_streams import AsyncTokenStream, TokenStream
from shardmesh.client_types import DEFAULT_MAX_NEW_TOKENS, Generation, Token, build_request  # noqa: F401
from shardmesh.security import (  # noqa: F401  (re-exported)
    HandshakeWatch, bearer_metadata, check_token, client_credentials,
)
from shardmesh.v1 import router_pb2, router_pb2_grpc

# Set deliberately (gRPC's default receive limit is 4 MiB): a response carrying full-vocabulary
# logits is vocab * 4 bytes; requests are prompts, far smaller.
MAX_RECEIVE_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_SEND_MESSAGE_BYTES = 64 * 1024 * 1024
# Keepalive notices a dead router during a long generation; servers accept pings every >= 5 s.
_KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]
UNARY_TIMEOUT_S = 30.0  # deadline of model_info / cluster_status when neither call nor client sets one
_RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def channel_options(max_receive_message_bytes: int, max_send_message_bytes: int,
                    options: Sequence[tuple[str, object]] = ()) -> list[tuple[str, object]]:
    """The SDK's channel options; entries of `options` override them key by key."""
    merged = dict([("grpc.max_receive_message_length", max_receive_message_bytes),
                   ("grpc.max_send_message_length", max_send_message_bytes), *_KEEPALIVE_OPTIONS])
    merged.update(options)
    return list(merged.items())


class _ServingWait:
    """Deadline and exponential backoff of `wait_until_serving` (shared by both clients)."""

    def __init__(self, address: str, timeout: float):
        self.address, self.timeout = address, timeout
        self.deadline = time.monotonic() + timeout
        self.delay, self.last = 0.05, "no answer yet"
        self.handshake = HandshakeWatch()

    def attempt_timeout(self) -> float:
        return max(0.01, min(self.deadline - time.monotonic(), UNARY_TIMEOUT_S))

    def note(self, status: router_pb2.ClusterStatus | None, error: ShardmeshError | None) -> None:
        """Record one attempt; non-retryable errors are raised at once."""
        if error is not None:
            if error.code not in _RETRYABLE:
                raise error
            why = self.handshake.failure(error.details) if error.code == "UNAVAILABLE" else None
            if why is not None:  # retrying cannot fix certificates: say so now, not at the deadline
                raise UnavailableError(f"router at {self.address}: {why}") from error
            self.last = str(error)
        else:
            registered = sum(server.registered for server in status.servers)
            self.last = f"serving=false, {registered}/{len(status.servers)} servers registered"

    def next_delay(self) -> float:
        """Seconds to sleep before the next attempt; raises DeadlineExceededError when time is up."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(
                f"router at {self.address} not serving after {self.timeout:g} s (last: {self.last})")
        delay, self.delay = min(self.delay, remaining), min(self.delay * 2, 1.0)
        return delay


class _ClientBase:
    _grpc = grpc  # the module whose channels this client opens: grpc, or grpc.aio

    def __init__(self, address: str, *, timeout: float | None = None,
                 max_receive_message_bytes: int = MAX_RECEIVE_MESSAGE_BYTES,
                 max_send_message_bytes: int = MAX_SEND_MESSAGE_BYTES,
                 options: Sequence[tuple[str, object]] = (),
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None):
        self.address = address
        self.timeout = timeout
        # Sent on every call as `authorization: Bearer <token>` (the router's --auth-token-file).
        self._metadata = bearer_metadata(check_token(token, "token") if token is not None else None)
        opts = channel_options(max_receive_message_bytes, max_send_message_bytes, options)
        self._channel = (self._grpc.secure_channel(address, credentials, options=opts) if credentials
                         else self._grpc.insecure_channel(address, options=opts))
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    def _call_timeout(self, timeout: float | None, unary: bool) -> float | None:
        if timeout is not None:
            return timeout
        if self.timeout is not None or not unary:
            return self.timeout
        return UNARY_TIMEOUT_S


class Client(_ClientBase):
    """Synchronous client of a mesh's router at `address` ("host:port").

    `timeout` is the default deadline in seconds of every call (a Generate call's deadline covers
    the whole stream); None = no deadline for generate, UNARY_TIMEOUT_S for the unary calls.
    `options` are extra gRPC channel options (they override the SDK's); `credentials` makes the
    channel secure (`client_credentials(ca_file, cert_file, key_file)` reads PEM files); `token`
    is the router's bearer token (a wrong or missing one: UnauthenticatedError).
    """

    def generate(self, prompt: Sequence[int] | str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, return_logits: bool = False,
                 timeout: float | None = None) -> TokenStream:
        """Start generating; returns an iterator of `Token` (in index order, the last with finish_reason).

        A str prompt is tokenized by the router, a sequence of ints is sent as token ids. Bad
        arguments raise InvalidArgumentError here; server-side failures raise on iteration.
        """
        request = build_request(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                return_logits=return_logits)
        return TokenStream(self._stub.Generate(request, timeout=self._call_timeout(timeout, unary=False),
                                               metadata=self._metadata))

    def generate_all(self, prompt: Sequence[int] | str, **kwargs) -> Generation:
        """Generate to the end and return every token (same arguments as `generate`)."""
        with self.generate(prompt, **kwargs) as stream:
            return Generation(tuple(stream))

    def _unary(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self._call_timeout(timeout, unary=True), metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def model_info(self, *, timeout: float | None = None) -> router_pb2.ModelInfo:
        """What model the mesh serves and its limits (vocab_size, max_context, eos ids, ...)."""
        return self._unary(self._stub.GetModelInfo, router_pb2.GetModelInfoRequest(), timeout)

    def cluster_status(self, *, timeout: float | None = None) -> router_pb2.ClusterStatus:
        """Which server holds what, whether each has registered, and whether the mesh is serving."""
        return self._unary(self._stub.GetClusterStatus, router_pb2.GetClusterStatusRequest(), timeout)

    def wait_until_serving(self, timeout: float = 60.0) -> router_pb2.ClusterStatus:
        """Poll cluster_status (backoff 50 ms doubling to 1 s) until `serving`; return that status.

        Unreachable router / not yet serving: keep polling until `timeout` s, then raise
        DeadlineExceededError saying what was last seen. Any other error is raised at once.
        """
        wait = _ServingWait(self.address, timeout)
        while True:
            try:
                status = self.cluster_status(timeout=wait.attempt_timeout())
                if status.serving:
                    return status
                wait.note(status, None)
            except ShardmeshError as error:
                wait.note(None, error)
            time.sleep(wait.next_delay())

    def close(self) -> None:
        """Close the channel (cancelling calls still running)."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """`Client` over grpc.aio: create it inside the event loop that uses it; same arguments."""

    _grpc = grpc.aio

    def generate(self, prompt: Sequence[int] | str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, return_logits: bool = False,
                 timeout: float | None = None) -> AsyncTokenStream:
        """Start generating; returns an async iterator of `Token` (see `Client.generate`)."""
        request = build_request(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                                return_logits=return_logits)
        return AsyncTokenStream(self._stub.Generate(request, timeout=self._call_timeout(timeout, unary=False),
                                                    metadata=self._metadata))

    async def generate_all(self, prompt: Sequence[int] | str, **kwargs) -> Generation:
        """Generate to the end and return every token (same arguments as `generate`)."""
        async with self.generate(prompt, **kwargs) as stream:
            return Generation(tuple([token async for token in stream]))

    async def _unary(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=self._call_timeout(timeout, unary=True), metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error

    async def model_info(self, *, timeout: float | None = None) -> router_pb2.ModelInfo:
        """See `Client.model_info`."""
        return await self._unary(self._stub.GetModelInfo, router_pb2.GetModelInfoRequest(), timeout)

    async def cluster_status(self, *, timeout: float | None = None) -> router_pb2.ClusterStatus:
        """See `Client.cluster_status`."""
        return await self._unary(self._stub.GetClusterStatus, router_pb2.GetClusterStatusRequest(), timeout)

    async def wait_until_serving(self, timeout: float = 60.0) -> router_pb2.ClusterStatus:
        """See `Client.wait_until_serving`."""
        wait = _ServingWait(self.address, timeout)
        while True:
            try:
                status = await self.cluster_status(timeout=wait.attempt_timeout())
                if status.serving:
                    return status
                wait.note(status, None)
            except ShardmeshError as error:
                wait.note(None, error)
            await asyncio.sleep(wait.next_delay())

    async def close(self) -> None:
        """Close the channel (cancelling calls still running)."""
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
