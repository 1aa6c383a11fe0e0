"""OpenTelemetry traces: one trace per Generate request across router, stages and experts.

Off by default and free when off: `_tracer` is None, every hook returns at once and no span object
is created. `configure(endpoint, service, sample_ratio)` turns it on for this process (OTLP over
gRPC to `endpoint`, batched). The context travels as a W3C traceparent: in the `traceparent` gRPC
metadata of Generate (a client may join its own trace), and in the `traceparent` field of
StepRequest and ComputeExpertsRequest (the Step stream is long-lived and the shared-memory plane
has no metadata).

Cost when on (bench/tracing_overhead.py): the router decides per request, by trace id
(`sample_ratio`, parent-based: a caller's sampled traceparent is followed), and only sampled
requests get spans; a pipeline step gets spans only if it carries a sampled request, and stages
and experts only make spans under a sampled traceparent. The per-step and per-layer spans (all
but `generate` and `router.schedule`) are `_Span`s: ids, times and attributes kept in a few slots
and handed to the batch processor as one finished ReadableSpan when they end, with the current
span in a context variable, so none of the SDK's per-span machinery (sampler, span object, locks,
context attach/detach, propagator) runs per step.

Span tree of one request:  generate (router) -> router.schedule (time queued)
                                             -> router.step (one pipeline step; other requests of the
                                                batch are linked) -> stage.step (each stage)
                                                -> moe.dispatch (per MoE layer) -> expert.compute
                                                -> moe.combine"""

import contextlib
import contextvars
import random
import time

_tracer = None          # opentelemetry.trace.Tracer when configured
_provider = None
_propagator = None
_processor = None       # the BatchSpanProcessor: SDK spans end into it, and _Spans directly
_sdk = None             # what a _Span needs of the SDK, looked up once (see configure)
_NULL = contextlib.nullcontext()
# (trace id, span id) of the innermost _Span of this task/thread; None outside any.
_current: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("shardmesh_span", default=None)
# Export in batches of up to 512 spans, at least once a second; room for ~8 s of a busy mesh's spans.
EXPORT_DELAY_MS, EXPORT_BATCH, QUEUE_SPANS = 1000, 512, 8192
REQUESTS: dict[int, "RequestTrace"] = {}  # sequence id -> its trace, while the request runs (router)


def enabled() -> bool:
    return _tracer is not None


def otlp_exporter(endpoint: str, ca_file=None):
    """The OTLP/gRPC span exporter to `endpoint`: TLS verified with the CA in `ca_file` when given;
    else as OpenTelemetry's standard variables say (OTEL_EXPORTER_OTLP_[TRACES_]INSECURE,
    _CERTIFICATE, _CLIENT_CERTIFICATE/_KEY, _HEADERS) or an https:// / http:// endpoint; else
    plaintext (a collector beside the services, the default)."""
    import os
    import pathlib
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    if ca_file:
        import grpc
        credentials = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(ca_file).read_bytes())
        return OTLPSpanExporter(endpoint=endpoint, insecure=False, credentials=credentials, timeout=10)
    standard = endpoint.startswith(("http://", "https://")) or any(os.environ.get(v) for v in OTLP_TLS_VARIABLES)
    return OTLPSpanExporter(endpoint=endpoint, insecure=None if standard else True, timeout=10)


OTLP_TLS_VARIABLES = tuple(f"OTEL_EXPORTER_OTLP_{signal}{key}" for signal in ("", "TRACES_")
                           for key in ("INSECURE", "CERTIFICATE"))


def configure(endpoint: str, service: str, exporter=None, sample_ratio: float = 1.0, ca_file=None) -> None:
    """Export this process's spans over OTLP/gRPC to `endpoint` (host:port; plaintext unless
    `ca_file` or the standard variables ask for TLS, see otlp_exporter) as service `service`;
    `exporter` replaces the OTLP exporter (tests). `sample_ratio` (0, 1]: the share of requests
    without a caller's decision that are traced (by trace id, so every service agrees).
    Imports OpenTelemetry only here."""
    global _tracer, _provider, _propagator, _processor, _sdk
    import types
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, TraceFlags
    from opentelemetry.trace.status import Status, StatusCode
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    if not 0 < sample_ratio <= 1:
        raise ValueError(f"trace sample ratio {sample_ratio} is not in (0, 1]")
    if exporter is None:
        exporter = otlp_exporter(endpoint, ca_file)
    _provider = TracerProvider(resource=Resource.create({"service.name": service}),
                               sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    _processor = BatchSpanProcessor(exporter, max_queue_size=QUEUE_SPANS, schedule_delay_millis=EXPORT_DELAY_MS,
                                    max_export_batch_size=EXPORT_BATCH)
    _provider.add_span_processor(_processor)
    _tracer = _provider.get_tracer("shardmesh")
    _sdk = types.SimpleNamespace(ReadableSpan=ReadableSpan, SpanContext=SpanContext, Status=Status, StatusCode=StatusCode,
                                 sampled=TraceFlags(TraceFlags.SAMPLED), unset=Status(StatusCode.UNSET),
                                 resource=_provider.resource, scope=InstrumentationScope("shardmesh"))
    _propagator = TraceContextTextMapPropagator()


def shutdown() -> None:
    """Flush pending spans and turn tracing off."""
    global _tracer, _provider, _processor
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = _processor = None
    REQUESTS.clear()


def _context(traceparent: str):
    return _propagator.extract({"traceparent": traceparent}) if traceparent else None


def current_traceparent() -> str:
    """The current _Span as a W3C traceparent ("" when off or outside any: the callee makes none)."""
    current = _current.get() if _tracer is not None else None
    return "" if current is None else f"00-{current[0]:032x}-{current[1]:016x}-01"


def current_trace_id() -> str | None:
    """The current span's trace id in hex (None when off or outside any span)."""
    if _tracer is None:
        return None
    current = _current.get()
    if current is not None:
        return format(current[0], "032x")
    from opentelemetry import trace
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def span(name: str, **attributes):
    """A child span of the current _Span (a no-op context when off or outside a sampled request)."""
    current = _current.get() if _tracer is not None else None
    if current is None:
        return _NULL
    return _Span(name, current[0], current[1], False, attributes)


def server_span(name: str, traceparent: str, server: str):
    """A span for work asked by a remote caller whose span is `traceparent` (a no-op when off,
    and when the caller sent none or an unsampled one: its request is not traced)."""
    if _tracer is None or len(traceparent) != 55 or not traceparent.endswith("-01"):
        return _NULL
    try:
        trace_id, parent_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
    except ValueError:  # not hex: a traceparent from elsewhere that we cannot join
        return _NULL
    return _Span(name, trace_id, parent_id, True, {"shardmesh.server": server})


class _Span:
    """A span that exists as a few slots until it ends, then as one finished ReadableSpan handed
    to the batch processor; while open it is the current span (`_current`) of its task."""

    __slots__ = ("name", "trace_id", "span_id", "parent_id", "remote_parent", "attributes", "links", "start", "token")

    def __init__(self, name: str, trace_id: int, parent_id: int, remote_parent: bool, attributes: dict, links=()):
        self.name, self.trace_id, self.parent_id, self.remote_parent = name, trace_id, parent_id, remote_parent
        self.span_id = random.getrandbits(64) or 1
        self.attributes, self.links = attributes, links

    def __enter__(self) -> "_Span":
        self.start = time.time_ns()
        self.token = _current.set((self.trace_id, self.span_id))
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        end = time.time_ns()
        _current.reset(self.token)
        processor, sdk = _processor, _sdk
        if processor is None:  # tracing was shut down meanwhile
            return False
        status = sdk.unset if error is None else sdk.Status(sdk.StatusCode.ERROR, f"{kind.__name__}: {error}")
        processor.on_end(sdk.ReadableSpan(
            self.name, sdk.SpanContext(self.trace_id, self.span_id, False, sdk.sampled),
            sdk.SpanContext(self.trace_id, self.parent_id, self.remote_parent, sdk.sampled), sdk.resource,
            self.attributes, links=self.links, status=status, start_time=self.start, end_time=end,
            instrumentation_scope=sdk.scope))
        return False


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
    """Router Generate: the request's trace (a child of the caller's `traceparent` metadata, if
    any); None when off or when the sampler leaves this request out (its `generate` span, which
    records nothing, is ended at once)."""
    if _tracer is None:
        return None
    traceparent = dict(grpc_context.invocation_metadata() or ()).get("traceparent", "")
    request = RequestTrace(sequence_id, traceparent)
    if not request.span.is_recording():
        request.finish("unsampled", 0)
        return None
    return request


@contextlib.contextmanager
def _router_step(traces: list[RequestTrace], num_sequences: int):
    from opentelemetry import trace
    now = time.time_ns()
    for request in traces:
        if not request.scheduled:
            request.scheduled = True
            _tracer.start_span("router.schedule", context=request.context, start_time=request.arrived_ns).end(
                end_time=now)
    first = traces[0].span.get_span_context()
    links = [trace.Link(t.span.get_span_context()) for t in traces[1:]]
    with _Span("router.step", first.trace_id, first.span_id, False, {"shardmesh.batch_sequences": num_sequences},
               links) as step:
        yield step


def router_step(sequence_ids: list[int]):
    """Around one pipeline step on the router: a child of the first traced request's span, linked
    to the others' (a no-op when off or when no request of the step is traced)."""
    if _tracer is None:
        return _NULL
    traces = [REQUESTS[i] for i in sequence_ids if i in REQUESTS]
    return _router_step(traces, len(sequence_ids)) if traces else _NULL
