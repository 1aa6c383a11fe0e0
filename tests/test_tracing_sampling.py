"""Tracing's sampling, over real OTLP/gRPC: with a sample ratio the router traces only the requests
whose trace id it keeps; a request not kept creates no span anywhere (router, stages, experts: they
make spans only under a sampled traceparent); a caller's sampled traceparent is followed whatever
the ratio (parent-based), and that request's spans still form one tree across services."""

import asyncio
import random

import pytest

from shardmesh import grpc_util
from shardmesh.telemetry import tracing
from shardmesh.v1 import router_pb2, router_pb2_grpc

from mesh_helpers import local_mesh, topology
from otlp_receiver import OtlpReceiver

NEW_TOKENS = 3


@pytest.fixture
def tracing_off():
    yield
    tracing.shutdown()


async def generate(address: str, prompt: list[int], traceparent: str = "") -> list[int]:
    metadata = [("traceparent", traceparent)] if traceparent else None
    async with grpc_util.insecure_channel(address) as channel:
        call = router_pb2_grpc.RouterStub(channel).Generate(router_pb2.GenerateRequest(
            prompt_token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True), timeout=60, metadata=metadata)
        return [response.token_id async for response in call]


def test_unsampled_requests_make_no_spans_and_a_sampled_caller_is_followed(mixtral_dir, tracing_off):
    async def main():
        receiver = await OtlpReceiver().start()
        try:
            tracing.configure(receiver.endpoint, "shardmesh-test", sample_ratio=1e-9)  # keeps ~no trace id
            topo = topology([(0, 2), (2, 4)], [[0, 1, 2, 3], [4, 5, 6, 7]])
            async with local_mesh(mixtral_dir, topo) as mesh:
                for prompt in ([1, 5, 9], [2, 7]):
                    assert len(await generate(mesh.address, prompt)) == NEW_TOKENS
                    assert not tracing.REQUESTS
                caller_trace, caller_span = random.getrandbits(128) or 1, random.getrandbits(64) or 1
                traced = await generate(mesh.address, [1, 5, 9], f"00-{caller_trace:032x}-{caller_span:016x}-01")
                assert len(traced) == NEW_TOKENS
                await asyncio.to_thread(tracing.shutdown)  # flushes to the receiver on this loop
            assert {s.span.trace_id for s in receiver.spans} == {caller_trace.to_bytes(16, "big")}
            by_id = {s.span.span_id: s for s in receiver.spans}
            generate_span = next(s for s in receiver.spans if s.span.name == "generate")
            assert generate_span.span.parent_span_id == caller_span.to_bytes(8, "big")
            for received in receiver.spans:  # one tree under `generate`, across router, stages and experts
                if received is not generate_span:
                    assert received.span.parent_span_id in by_id, received.span.name
            names = [s.span.name for s in receiver.spans]
            assert names.count("stage.step") == 2 * names.count("router.step") >= 2 * NEW_TOKENS
            assert names.count("expert.compute") > 0 and names.count("moe.dispatch") == names.count("moe.combine")
        finally:
            await receiver.stop()

    asyncio.run(main())


def test_stage_and_expert_hooks_make_no_span_without_a_sampled_traceparent(tracing_off):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter = InMemorySpanExporter()
    tracing.configure("unused:1", "shardmesh-test", exporter=exporter)
    for traceparent in ("", f"00-{'a' * 32}-{'b' * 16}-00", "not a traceparent", f"00-{'x' * 32}-{'b' * 16}-01"):
        assert tracing.server_span("stage.step", traceparent, "stage-0") is tracing._NULL, traceparent
    assert tracing.span("moe.dispatch", layer=0) is tracing._NULL  # outside any traced request
    assert tracing.current_traceparent() == ""
    with tracing.server_span("stage.step", f"00-{'a' * 32}-{'b' * 16}-01", "stage-0"):
        with tracing.span("moe.dispatch", layer=1):
            inner = tracing.current_traceparent()
        with pytest.raises(RuntimeError), tracing.span("moe.combine", layer=1):
            raise RuntimeError("combine failed")
    tracing.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"stage.step", "moe.dispatch", "moe.combine"}
    assert inner == f"00-{'a' * 32}-{spans['moe.dispatch'].context.span_id:016x}-01"
    assert spans["stage.step"].parent.span_id == int("b" * 16, 16) and spans["stage.step"].parent.is_remote
    assert spans["moe.dispatch"].parent.span_id == spans["stage.step"].context.span_id
    assert spans["moe.combine"].status.status_code.name == "ERROR" and "combine failed" in spans["moe.combine"].status.description
    assert spans["moe.dispatch"].attributes == {"layer": 1}
