"""Refusing Generate under overload for next to nothing.

When the admission queue is full (RouterState.admission_full: `--max-batch-sequences` running and
`--max-queued` waiting), a Generate call gets RESOURCE_EXHAUSTED from `AdmissionGate`, a server
interceptor that runs after the token check and before anything else: its request is never
received from the transport nor parsed, no servicer generator, request guard wrapper or exception
is created (the status is set and the handler returns), and the handler is built once. The
refusal is served as a stream-stream handler on purpose: grpc.aio then skips the receive-message
batch it runs for every unary request (a round trip through grpc's completion queue thread:
about a quarter of a refusal's CPU, bench/refusal_cost.py); the client, which sent one message,
sees the same status either way. A refusal then costs the router about what grpc.aio's bare
handler does (~0.25 ms of CPU here), which is also about what the refused client spends on the
call: a flood costs the router about as much CPU as the flooding client burns (see
bench/admission_overload.py). The servicer keeps the same check for the race where the queue
fills between this gate and the servicer.
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

        async def refuse(requests, context: grpc.aio.ServicerContext) -> None:
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(details)

        # Stream-stream and never iterated: the request is not even received (see the module
        # docstring). Built once, returned for every refused call.
        self._refusal = grpc.stream_stream_rpc_method_handler(refuse)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method == GENERATE and self.state.admission_full():
            return self._refusal
        return await continuation(handler_call_details)
