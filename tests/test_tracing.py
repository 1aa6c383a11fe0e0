"""Traces over real OTLP/gRPC: one Generate request's spans form one tree across the router,
every stage and every expert server, the context crossing the wire as a W3C traceparent; and with
tracing off no span is created at all."""

import asyncio
import io
import json
import logging

import pytest

from shardmesh.client import AsyncClient
from shardmesh.telemetry import tracing

from mesh_helpers import local_mesh, topology
from otlp_receiver import OtlpReceiver, assert_one_tree
from test_logs import json_handler

MAX_NEW_TOKENS = 3


@pytest.fixture
def tracing_off():
    yield
    tracing.shutdown()


def check_request_tree(receiver: OtlpReceiver, num_stages: int, expert_servers: set[str]) -> None:
    spans = receiver.trace_of("generate")
    by_id = assert_one_tree(spans, "generate")
    names = [s.span.name for s in spans]
    steps = names.count("router.step")
    assert steps >= MAX_NEW_TOKENS and names.count("router.schedule") == 1
    assert names.count("stage.step") == steps * num_stages
    # every stage step is a child of a router step; dispatch/combine of a stage step; experts of a dispatch
    parent = {s.span.span_id: by_id[s.span.parent_span_id].span.name for s in spans if s.span.parent_span_id}
    expected_parent = {"router.schedule": "generate", "router.step": "generate", "stage.step": "router.step",
                       "moe.dispatch": "stage.step", "moe.combine": "stage.step", "expert.compute": "moe.dispatch"}
    for s in spans:
        if s.span.name != "generate":
            assert parent[s.span.span_id] == expected_parent[s.span.name], s.span.name
    assert names.count("moe.dispatch") == names.count("moe.combine") > 0
    stages = {s.attribute("shardmesh.server") for s in spans if s.span.name == "stage.step"}
    experts = {s.attribute("shardmesh.server") for s in spans if s.span.name == "expert.compute"}
    assert stages == {f"stage-{i}" for i in range(num_stages)} and experts == expert_servers


@pytest.fixture
def request_log_lines():
    """JSON lines of the router's per-request log (shardmesh.requests) while the test runs."""
    lines = io.StringIO()
    logger = logging.getLogger("shardmesh.requests")
    handler = json_handler(lines)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def test_one_request_is_one_trace_across_services(mixtral_dir, tracing_off, monkeypatch, request_log_lines):
    async def main():
        receiver = await OtlpReceiver().start()
        try:
            tracing.configure(receiver.endpoint, "shardmesh-test")
            topo = topology([(0, 2), (2, 4)], [[0, 1, 2, 3], [4, 5, 6, 7]])
            async with local_mesh(mixtral_dir, topo) as mesh, AsyncClient(mesh.address, timeout=60) as client:
                tokens = [t.token_id async for t in client.generate([1, 5, 9], max_new_tokens=MAX_NEW_TOKENS,
                                                                    ignore_eos=True)]
                assert len(tokens) == MAX_NEW_TOKENS
                await asyncio.to_thread(tracing.shutdown)  # flushes to the receiver on this loop
                check_request_tree(receiver, 2, {"experts-0", "experts-1"})
                assert {s.service for s in receiver.spans} == {"shardmesh-test"}
                # the request's log line names its trace
                trace_id = receiver.trace_of("generate")[0].span.trace_id.hex()
                assert [json.loads(line)["trace_id"] for line in request_log_lines.getvalue().splitlines()] == [trace_id]

                # Off: the same request creates no span object anywhere.
                received = len(receiver.spans)
                from opentelemetry.sdk import trace as sdk_trace

                def no_spans(*args, **kwargs):
                    raise AssertionError("a span was created with tracing off")
                monkeypatch.setattr(sdk_trace.Tracer, "start_span", no_spans)
                monkeypatch.setattr(tracing._Span, "__init__", no_spans)  # the per-step spans' own path
                again = [t.token_id async for t in client.generate([1, 5, 9], max_new_tokens=MAX_NEW_TOKENS,
                                                                   ignore_eos=True)]
                assert again == tokens and len(receiver.spans) == received and not tracing.REQUESTS
        finally:
            await receiver.stop()

    asyncio.run(main())


@pytest.mark.slow
def test_one_request_is_one_trace_across_processes(mixtral_dir, tmp_path):
    """The same tree from real processes (`--otlp-endpoint` on every service): each exports
    under its own service name, and the context crosses process boundaries on the wire."""
    from shardmesh.launcher import Launcher

    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(topology([(0, 2), (2, 4)], [[0, 1, 2, 3], [4, 5, 6, 7]]).to_toml())

    async def main():
        receiver = await OtlpReceiver().start()
        try:
            otlp = ["--otlp-endpoint", receiver.endpoint]
            launcher = Launcher(mixtral_dir, topology_file, no_auth=True,
                                service_args={"router": otlp, "stage": otlp, "expert": otlp})
            await asyncio.to_thread(launcher.__enter__)
            try:
                async with AsyncClient(launcher.router_address, timeout=60) as client:
                    tokens = [t async for t in client.generate([1, 5, 9], max_new_tokens=MAX_NEW_TOKENS,
                                                               ignore_eos=True)]
                    assert len(tokens) == MAX_NEW_TOKENS
            finally:
                await asyncio.to_thread(launcher.stop)  # every service flushes its spans as it stops
            check_request_tree(receiver, 2, {"experts-0", "experts-1"})
            services = {s.service for s in receiver.trace_of("generate")}
            assert services == {"shardmesh-router", "shardmesh-stage-0", "shardmesh-stage-1",
                                "shardmesh-experts-0", "shardmesh-experts-1"}
        finally:
            await receiver.stop()

    asyncio.run(main())
