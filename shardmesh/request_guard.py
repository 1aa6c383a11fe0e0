"""A request that is not a valid protobuf message gets INVALID_ARGUMENT naming the message type.

grpc.aio answers a request its deserializer cannot parse with UNKNOWN ("Unexpected DecodeError"),
which says nothing to the caller and reads like a server bug. `MalformedRequestGuard` wraps every
method's deserializer so that a parse failure becomes a marker, and the method's behaviour so that
the marker ends the call with INVALID_ARGUMENT before any servicer code sees it. Bytes are only
ever parsed as protobuf: nothing received is unpickled or evaluated.
"""

import inspect

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    """What a request that failed to parse becomes."""

    def __init__(self, type_name: str, error: Exception):
        self.message = f"request: not a valid {type_name} message ({error})"


def _guarded_deserializer(deserializer):
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound to its class
    type_name = owner.DESCRIPTOR.full_name if hasattr(owner, "DESCRIPTOR") else "request"

    def deserialize(raw: bytes):
        try:
            return deserializer(raw)
        except (DecodeError, ValueError, TypeError, RuntimeError) as error:  # what FromString raises on bad bytes
            return _Malformed(type_name, error)

    return deserialize


async def _checked(request_iterator, context):
    async for request in request_iterator:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


def _guarded_behavior(behavior, request_streaming: bool):
    async def check(request, context):
        if request_streaming:
            return _checked(request, context)
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return request

    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            async for response in behavior(await check(request, context), context):
                yield response
        return stream

    async def call(request, context):
        return await behavior(await check(request, context), context)
    return call


_HANDLER_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    """Turn unparseable requests into INVALID_ARGUMENT (see the module docstring)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        attribute, factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, attribute)
        return factory(_guarded_behavior(behavior, handler.request_streaming),
                       request_deserializer=_guarded_deserializer(handler.request_deserializer),
                       response_serializer=handler.response_serializer)
