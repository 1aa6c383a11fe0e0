"""An in-process OTLP/gRPC trace receiver: the collector's TraceService on loopback, keeping
every span it is sent with its resource's service.name."""

import dataclasses

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclasses.dataclass
class ReceivedSpan:
    service: str
    span: object  # opentelemetry.proto.trace.v1.Span

    def attribute(self, key: str):
        for attribute in self.span.attributes:
            if attribute.key == key:
                value = attribute.value
                return getattr(value, value.WhichOneof("value"))
        return None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans: list[ReceivedSpan] = []
        self.server = None
        self.port = 0

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(ReceivedSpan(service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> "OtlpReceiver":
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(None)

    def trace_of(self, name: str) -> list[ReceivedSpan]:
        """Every span of the (one) trace holding a span called `name`."""
        roots = [s for s in self.spans if s.span.name == name]
        assert len(roots) == 1, f"{len(roots)} spans named {name!r} among {len(self.spans)}"
        return [s for s in self.spans if s.span.trace_id == roots[0].span.trace_id]


def assert_one_tree(spans: list[ReceivedSpan], root_name: str) -> dict[bytes, ReceivedSpan]:
    """The spans form one tree rooted at the one span called `root_name`; returns them by id."""
    by_id = {s.span.span_id: s for s in spans}
    assert len(by_id) == len(spans), "duplicate span ids"
    roots = [s for s in spans if s.span.parent_span_id not in by_id]
    assert [r.span.name for r in roots] == [root_name], f"roots: {[(r.service, r.span.name) for r in roots]}"
    assert roots[0].span.parent_span_id == b"", "the root has a parent that was not received"
    return by_id
