"""Traces to a collector that speaks TLS: with `--otlp-ca` (tracing.configure's ca_file), or with
OpenTelemetry's standard OTEL_EXPORTER_OTLP_CERTIFICATE variable, spans reach an in-process OTLP
receiver that accepts TLS only (certificates from shardmesh.certs); the default exporter is
plaintext and reaches none there."""

import asyncio
import threading

import grpc
import pytest

from shardmesh.certs import make_certs
from shardmesh.telemetry import tracing

from otlp_receiver import OtlpReceiver

TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"  # a sampled caller: server_span makes a span


class TlsReceiver(OtlpReceiver):
    """The receiver on a TLS-only loopback port, in its own thread's event loop (the exporter's
    calls are blocking, from the span processor's thread)."""

    def __init__(self, certificate: bytes, key: bytes):
        super().__init__()
        self.credentials = grpc.ssl_server_credentials([(key, certificate)])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_secure_port("127.0.0.1:0", self.credentials)
        await self.server.start()

    def __enter__(self) -> "TlsReceiver":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path / "certs")


@pytest.fixture
def receiver(certs):
    with TlsReceiver(certs["service"].read_bytes(), certs["service_key"].read_bytes()) as running:
        yield running
    tracing.shutdown()


def export_one_span(receiver: TlsReceiver, **configure) -> list:
    """Configure tracing, make one span, flush: shutdown returns once the export succeeded or
    failed, so what the receiver holds then is all it will get. The names of the spans received."""
    tracing.configure(receiver.endpoint, "shardmesh-test", **configure)
    with tracing.server_span("otlp.tls.check", TRACEPARENT, "test"):
        pass
    tracing.shutdown()
    return [s.span.name for s in receiver.spans]


def test_spans_reach_a_tls_collector_with_the_ca_given(receiver, certs):
    assert export_one_span(receiver, ca_file=certs["ca"]) == ["otlp.tls.check"]


def test_the_standard_certificate_variable_is_honoured(receiver, certs, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(certs["ca"]))
    assert export_one_span(receiver) == ["otlp.tls.check"]


def test_the_default_plaintext_exporter_reaches_no_tls_collector(receiver, monkeypatch):
    for variable in tracing.OTLP_TLS_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert export_one_span(receiver) == []
