"""The bearer tokens on the wire (shardmesh/security.py decides which): the server interceptor that
refuses a call without the token its service needs, before its request is read, and the client
interceptors that send a token on every call of a grpc.aio channel. grpcio only, as the SDK."""

import hmac

import grpc

from shardmesh.client_tokens import ClientTokens

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
CLIENT_SERVICES = frozenset({"shardmesh.v1.Router"})
# Admin (live rebalancing) changes where activations go: operators and services only.
INTERNAL_SERVICES = frozenset({"shardmesh.v1.Registry", "shardmesh.v1.Stage", "shardmesh.v1.Expert",
                               "shardmesh.v1.DataPlane", "shardmesh.v1.Admin"})


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (nothing for None)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse a call without the token its service requires with UNAUTHENTICATED, before its
    request is parsed (the refusal reads no message)."""

    def __init__(self, client_tokens: ClientTokens | None, internal_token: str | None):
        self._client = client_tokens
        self._internal = internal_token.encode() if internal_token else None

    def _accepted(self, service: str) -> list:
        """Tokens that open `service` (ClientTokens or the internal token's bytes); [] = not token-checked."""
        if service in OPEN_SERVICES:
            return []
        if service in CLIENT_SERVICES:
            return [self._client] if self._client else []
        if service in INTERNAL_SERVICES:
            return [self._internal] if self._internal else []
        return [token for token in (self._client, self._internal) if token]

    async def intercept_service(self, continuation, handler_call_details):
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        accepted = self._accepted(service)
        if not accepted:
            return await continuation(handler_call_details)
        presented = [value for key, value in handler_call_details.invocation_metadata or ()
                     if key == "authorization"]
        matched = False
        for value in presented:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            for token in accepted:  # every comparison runs: no early exit to time
                if isinstance(token, ClientTokens):
                    matched |= token.name_of(raw) is not None
                else:
                    matched |= hmac.compare_digest(raw, b"Bearer " + token)
        if matched:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        why = "no bearer token" if not presented else "wrong bearer token"
        return _refusal(handler, f"authorization: {why} for {service}")


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind whose request stays raw bytes and that aborts at once."""

    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    request_streaming = handler.request_streaming if handler else False
    response_streaming = handler.response_streaming if handler else False
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class _TokenInterceptor:
    """Adds `authorization: Bearer <token>` to every call it sees."""

    def __init__(self, token: str):
        self._metadata = bearer_metadata(token)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *self._metadata))


# grpc.aio files an interceptor under the first of the four kinds it is an instance of, so each
# kind has its own class.
class _UnaryUnaryToken(_TokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamToken(_TokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryToken(_TokenInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamToken(_TokenInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send `token` on every call of a grpc.aio channel."""
    return [kind(token) for kind in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]
