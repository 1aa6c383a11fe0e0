"""Errors raised by core code about a request, mapped to gRPC status codes by the servicers.

Core code never imports grpc: each error carries the *name* of its status code and the request
field it concerns, and `shardmesh.grpc_util.abort_for` turns it into a status.
"""


class RequestError(Exception):
    """Something in a request is wrong; `field` names it (dotted path), `code` is a grpc.StatusCode name."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidArgument(RequestError):
    code = "INVALID_ARGUMENT"


class NotFound(RequestError):
    code = "NOT_FOUND"


class FailedPrecondition(RequestError):
    code = "FAILED_PRECONDITION"


class Unavailable(RequestError):
    code = "UNAVAILABLE"


class ResourceExhausted(RequestError):
    code = "RESOURCE_EXHAUSTED"
