"""OpenTelemetry traces: one trace per Generate request across router, stages and experts.

Off by default and free when off: `_tracer` is None, every hook returns at once and no span object
is created. `configure(endpoint, service)` turns it on for this process (OTLP over gRPC to
`endpoint`, batched). The context travels as a W3C traceparent: in the `traceparent` gRPC metadata
of Generate (a client may join its own trace), and in the `traceparent` field of StepRequest and
ComputeExpertsRequest (the Step stream is long-lived and the shared-memory plane has no metadata).

Span tree of one request:  generate (router) -> router.schedule (time queued)
                                             -> router.step (one pipeline step; other requests of the
                                                batch are linked) -> stage.step (each stage)
                                                -> moe.dispatch (per MoE layer) -> expert.compute
                                                -> moe.combine"""

import contextlib
import time

_tracer = None          # opentelemetry.trace.Tracer when configured
_provider = None
_propagator = None
_NULL = contextlib.nullcontext()
REQUESTS: dict[int, "RequestTrace"] = {}  # sequence id -> its trace, while the request runs (router)


def enabled() -> bool:
    return _tracer is not None


def configure(endpoint: str, service: str, exporter=None) -> None:
    """Export this process's spans over OTLP/gRPC to `endpoint` (host:port, plaintext) as service
    `service`; `exporter` replaces the OTLP exporter (tests). Imports OpenTelemetry only here."""
    global _tracer, _provider, _propagator
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10)
    _provider = TracerProvider(resource=Resource.create({"service.name": service}))
    _provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    _tracer = _provider.get_tracer("shardmesh")
    _propagator = TraceContextTextMapPropagator()


def shutdown() -> None:
    """Flush pending spans and turn tracing off."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None
    REQUESTS.clear()


def _context(traceparent: str):
    return _propagator.extract({"traceparent": traceparent}) if traceparent else None


def current_traceparent() -> str:
    """The current span as a W3C traceparent ("" when off or outside any span)."""
    if _tracer is None:
        return ""
    carrier = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def current_trace_id() -> str | None:
    """The current span's trace id in hex (None when off or outside any span)."""
    if _tracer is None:
        return None
    from opentelemetry import trace
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def span(name: str, **attributes):
    """A child span of the current one (a no-op context when off)."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name, attributes=attributes)


def server_span(name: str, traceparent: str, server: str):
    """A span for work asked by a remote caller whose span is `traceparent` (a no-op when off)."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name, context=_context(traceparent), attributes={"shardmesh.server": server})


class RequestTrace:
    """The router's spans of one request: `generate` from arrival to the end, `router.schedule`
    from arrival to its first pipeline step."""

    def __init__(self, sequence_id: int, traceparent: str):
        from opentelemetry import trace
        self.sequence_id = sequence_id
        self.arrived_ns = time.time_ns()
        self.span = _tracer.start_span("generate", context=_context(traceparent),
                                       attributes={"shardmesh.sequence_id": sequence_id})
        self.context = trace.set_span_in_context(self.span)
        self.scheduled = False
        REQUESTS[sequence_id] = self

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def finish(self, outcome: str, tokens: int) -> None:
        self.span.set_attribute("shardmesh.outcome", outcome)
        self.span.set_attribute("shardmesh.output_tokens", tokens)
        self.span.end()
        REQUESTS.pop(self.sequence_id, None)


def start_request(sequence_id: int, grpc_context) -> RequestTrace | None:
    """Router Generate: the request's trace (a child of the caller's `traceparent` metadata, if any)."""
    if _tracer is None:
        return None
    traceparent = dict(grpc_context.invocation_metadata() or ()).get("traceparent", "")
    return RequestTrace(sequence_id, traceparent)


@contextlib.contextmanager
def _router_step(traces: list[RequestTrace], num_sequences: int):
    from opentelemetry import trace
    now = time.time_ns()
    for request in traces:
        if not request.scheduled:
            request.scheduled = True
            _tracer.start_span("router.schedule", context=request.context, start_time=request.arrived_ns).end(
                end_time=now)
    links = [trace.Link(t.span.get_span_context()) for t in traces[1:]]
    with _tracer.start_as_current_span("router.step", context=traces[0].context, links=links,
                                       attributes={"shardmesh.batch_sequences": num_sequences}) as step:
        yield step


def router_step(sequence_ids: list[int]):
    """Around one pipeline step on the router: a child of the first traced request's span, linked
    to the others' (a no-op when off or when no request of the step is traced)."""
    if _tracer is None:
        return _NULL
    traces = [REQUESTS[i] for i in sequence_ids if i in REQUESTS]
    return _router_step(traces, len(sequence_ids)) if traces else _NULL
