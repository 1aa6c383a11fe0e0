"""Refusing Generate under overload for next to nothing.

When the admission queue is full (RouterState.admission_full: `--max-batch-sequences` running and
`--max-queued` waiting), a Generate call gets RESOURCE_EXHAUSTED from `AdmissionGate`, a server
interceptor that runs after the token check and before anything else: its request bytes are never
parsed, no servicer generator, request guard wrapper or exception is created (the status is set
and the handler returns), and the handler is built once. A flood of refused requests then costs
the router grpc's own per-call work and little more, which is what keeps the admitted requests'
throughput (bench/admission_overload.py). The servicer keeps the same check for the race where
the queue fills between this gate and the servicer.
"""

import grpc

GENERATE = "/shardmesh.v1.Router/Generate"


def refusal_details(max_queued: int) -> str:
    """The refusal's status details (field first, as every refusal of ours)."""
    return f"router: {max_queued} requests already wait for a batch slot (--max-queued): retry later"


class AdmissionGate(grpc.aio.ServerInterceptor):
    """RESOURCE_EXHAUSTED for Generate while `state.admission_full()` (see the module docstring)."""

    def __init__(self, state):
        self.state = state  # router.main.RouterState
        details = refusal_details(state.max_queued)

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(details)

        # No deserializer: the request stays bytes. Built once, returned for every refused call.
        self._refusal = grpc.unary_stream_rpc_method_handler(refuse)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method == GENERATE and self.state.admission_full():
            return self._refusal
        return await continuation(handler_call_details)
