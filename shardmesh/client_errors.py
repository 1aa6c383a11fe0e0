"""Typed errors of the client SDK: one class per gRPC status a caller can act on.

Every `grpc.RpcError` (sync) or `grpc.aio.AioRpcError` (async) that reaches the SDK's surface is
turned into one of these by `from_rpc_error`; codes without a class of their own (UNIMPLEMENTED,
INTERNAL, ...) become a plain `ShardmeshError` carrying the code's name. Needs only grpcio.
"""

import grpc


class ShardmeshError(Exception):
    """A call to the mesh failed. `code` is the gRPC status name ("UNAVAILABLE"), `details` the server's text."""

    def __init__(self, code: str, details: str = ""):
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code}: {self.details}" if self.details else self.code


class _StatusError(ShardmeshError):
    """A ShardmeshError whose code is fixed by its class (`STATUS`)."""

    STATUS = "UNKNOWN"

    def __init__(self, details: str = ""):
        super().__init__(self.STATUS, details)
        self.args = (details,)  # so that pickling rebuilds it with the one-argument constructor


class InvalidArgumentError(_StatusError):
    """The request is malformed (a token id out of range, max_new_tokens < 1, ...); do not retry it."""

    STATUS = "INVALID_ARGUMENT"


class NotFoundError(_StatusError):
    """Something the request names does not exist."""

    STATUS = "NOT_FOUND"


class FailedPreconditionError(_StatusError):
    """The mesh is not in a state to serve this request (e.g. text prompt without a tokenizer)."""

    STATUS = "FAILED_PRECONDITION"


class ResourceExhaustedError(_StatusError):
    """Too many or too big (admission queue, message size); retry later or smaller.

    A prompt past the context limit is an InvalidArgumentError naming the field."""

    STATUS = "RESOURCE_EXHAUSTED"


class UnavailableError(_StatusError):
    """The router (or a server behind it) cannot be reached now; retrying may help."""

    STATUS = "UNAVAILABLE"


class DeadlineExceededError(_StatusError):
    """The call's deadline passed before it finished (also: `wait_until_serving` timed out)."""

    STATUS = "DEADLINE_EXCEEDED"


class CancelledError(_StatusError):
    """The call was cancelled (by the server, or by another thread of this client)."""

    STATUS = "CANCELLED"


class UnauthenticatedError(_StatusError):
    """The call lacks valid credentials."""

    STATUS = "UNAUTHENTICATED"


_BY_STATUS = {
    cls.STATUS: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        UnauthenticatedError,
    )
}


def error_for(code: str, details: str = "") -> ShardmeshError:
    """The typed error for a status name; names without a class give a plain ShardmeshError."""
    cls = _BY_STATUS.get(code)
    return cls(details) if cls is not None else ShardmeshError(code, details)


def from_rpc_error(error: grpc.RpcError) -> ShardmeshError:
    """Map a sync or aio RpcError to its typed error (code and details copied from the call)."""
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    status = code() if callable(code) else None
    text = details() if callable(details) else None
    name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    return error_for(name, text if text is not None else str(error))
