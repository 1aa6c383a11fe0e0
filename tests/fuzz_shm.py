"""Hostile call frames on the shared-memory data plane (shardmesh.shm_server), for the
property-based tests: a genuine session (key from OfferDataPlanes, a segment of ours that the
server maps), then calls one at a time whose method, reply offsets and request bytes are generated;
every reply is checked as fuzz_strategies.check_answer checks a gRPC status."""

import struct

import grpc
from hypothesis import given
from hypothesis import strategies as st

from fuzz_strategies import FUZZ_SETTINGS, REQUESTS_PER_RPC, TEXT, U64, Counter, check_answer
from shardmesh import grpc_util
from shardmesh.shm_plane import ShmChannel
from shardmesh.v1 import dataplane_pb2, dataplane_pb2_grpc
from shm_helpers import raw_call

SEGMENT_BYTES = 1 << 16
SPAN_ROWS_AT = 64  # valid float32 rows (0.25 each) fill the segment from this offset: spans may point there


async def shm_session(address: str) -> ShmChannel:
    async with grpc_util.insecure_channel(address) as channel:
        offer = await dataplane_pb2_grpc.DataPlaneStub(channel).OfferDataPlanes(
            dataplane_pb2.OfferDataPlanesRequest(), timeout=10)
    assert offer.shm_socket, f"{address} offers no shared-memory plane"
    session = await ShmChannel.open(address, offer, SEGMENT_BYTES)
    count = (SEGMENT_BYTES - SPAN_ROWS_AT) // 4
    session.segment.buffer[SPAN_ROWS_AT:SEGMENT_BYTES] = struct.pack(f"<{count}f", *[0.25] * count)
    return session


def fuzz_shm_calls(harness, address: str, method: str, requests: st.SearchStrategy, label: str) -> Counter:
    """At least REQUESTS_PER_RPC generated calls (mostly to `method`, with `requests` as bytes) on
    one session with the server at `address`; returns the counter (under `label`)."""
    counter = Counter()
    session = harness.run(shm_session(address))
    names = st.integers(0, 7).flatmap(lambda k: TEXT if k == 0 else st.just(method))  # mostly the method served
    offsets = st.one_of(st.integers(0, 2 * SEGMENT_BYTES), U64)
    calls = st.tuples(names, offsets, st.one_of(st.just(0), offsets), requests)  # reply offsets: host, CUDA

    async def send(batch):
        codes = []
        for name, offset, cuda_offset, request in batch:  # one call at a time on a session, as the plane requires
            status, details = await raw_call(session, name, request, offset, cuda_offset)
            code = next(c for c in grpc.StatusCode if c.value[0] == status)
            check_answer(f"shm {name}", request, code, details.decode() if status else "")
            codes.append(code)
        counter.add(label, codes)

    @FUZZ_SETTINGS
    @given(batch=st.lists(calls, min_size=10, max_size=10))
    def fuzz(batch):
        harness.run(send(batch))

    try:
        fuzz()
    finally:
        harness.run(session.close())
    print(label, counter.sent, counter.codes)
    assert counter.sent[label] >= REQUESTS_PER_RPC, counter.sent
    return counter
