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

With a tarpit (router/tarpit.py, `--tarpit-refusals-per-second`), a caller refused faster than
that gets its refusal only after a delay, which slows a closed-loop flood to a trickle; its
refusal then also names the delay and carries `retry-after` / `grpc-retry-pushback-ms`. The same
holds for the servicer's refusals of a caller past `--max-sequences-per-caller` (`held_refusal`).
"""

import grpc

from router.caller_limit import caller_of
from router.tarpit import backoff_metadata

GENERATE = "/shardmesh.v1.Router/Generate"


def refusal_details(max_queued: int) -> str:
    """The refusal's status details (field first, as every refusal of ours)."""
    return f"router: {max_queued} requests already wait for a batch slot (--max-queued): retry later"


async def held_refusal(state, context: grpc.aio.ServicerContext) -> str:
    """Count a refusal of this call's caller in the router's tarpit (if any) and hold it as long
    as the tarpit says; when held, set the backoff metadata and return what to add to the
    refusal's details ("" when refused at once)."""
    pit = state.tarpit
    if pit is None:
        return ""
    limit = state.caller_limit  # its identity says who a caller is
    held = await pit.hold(caller_of(context, limit.identity, limit.tokens))
    if not held:
        return ""
    context.set_trailing_metadata(backoff_metadata(held))
    return (f"; this caller is refused too often: back off (this refusal was held {held:.2f} s; "
            "--tarpit-refusals-per-second)")


class AdmissionGate(grpc.aio.ServerInterceptor):
    """RESOURCE_EXHAUSTED for Generate while `state.admission_full()` (see the module docstring)."""

    def __init__(self, state):
        self.state = state  # router.main.RouterState; its `tarpit` (router/tarpit.py) is read at each refusal
        details = refusal_details(state.max_queued)

        async def refuse(requests, context: grpc.aio.ServicerContext) -> None:
            backoff = await held_refusal(state, context)
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(details + backoff)

        # Stream-stream and never iterated: the request is not even received (see the module
        # docstring). Built once, returned for every refused call.
        self._refusal = grpc.stream_stream_rpc_method_handler(refuse)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method == GENERATE and self.state.admission_full():
            return self._refusal
        return await continuation(handler_call_details)
