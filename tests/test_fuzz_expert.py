"""Property-based hostile input to expert servers, as a buggy or hostile stage or router would send
it: at least REQUESTS_PER_RPC generated requests to each Expert RPC and DataPlane.OfferDataPlanes
over gRPC, and to ComputeExperts over the shared-memory data plane (ShmCall frames of a genuine
session, tensors in the segment at hostile offsets and lengths); none answered UNKNOWN, INTERNAL
or by a hang, every refusal naming its field. Afterwards the mesh still generates the reference
tokens and the experts compute what they computed before. LoadExperts / DropExperts go to an
expert server of their own (dropping an expert the mesh's placement uses would stop the mesh by
design: the router only drops what it has moved away)."""


import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bad_input_harness import (HIDDEN, TOPOLOGY, compute_experts, hidden_states, harness,  # noqa: F401  (fixtures)
                               tiny_moe_model)
from fuzz_strategies import (F32, FUZZ_SETTINGS, REQUESTS_PER_RPC, TEXT, U32, U64, Counter, batches, check_answer,
                             mangled, open_channel, perturbed, send_batch, tensors)
from shardmesh.service_config import ServiceConfig
from shardmesh.shm_frames import FRAME_VERSION
from shardmesh.v1 import dataplane_pb2, dataplane_pb2_grpc, expert_pb2, router_pb2, tensor_pb2
from fuzz_shm import SEGMENT_BYTES, SPAN_ROWS_AT, fuzz_shm_calls
from shm_helpers import hello as shm_hello
from wire_helpers import Rpc

from expert_server.main import start_expert_server

EXPERT = "/shardmesh.v1.Expert/"
RPCS = {f"Expert/{m}": Rpc(EXPERT + m, False, False)
        for m in ["ComputeExperts", "GetExpertInfo", "GetExpertLoad", "LoadExperts", "DropExperts"]}
RPCS["DataPlane/OfferDataPlanes"] = Rpc("/shardmesh.v1.DataPlane/OfferDataPlanes", False, False)
SHM_METHOD = "shardmesh.v1.Expert/ComputeExperts"
HELD_A = TOPOLOGY.expert_servers[0].experts  # experts-a
KEY = st.builds(router_pb2.ExpertKey, layer=st.one_of(st.integers(0, 2), U32), expert=st.one_of(st.integers(0, 4), U32))
GOOD = hidden_states(4, seed=1)


def compute_requests(span: bool = False) -> st.SearchStrategy:
    """Groups of held experts with a tensor each (mostly right), a field or two made hostile; with
    `span`, tensors may lie in the shared-memory segment (valid spans and hostile ones)."""
    def tensor(rows: st.SearchStrategy | None = None):  # rows: of the valid ones (default: any few)
        plain = tensors(st.integers(0, 6) if rows is None else rows, width=HIDDEN)
        if not span:
            return plain
        valid = st.builds(lambda rows, at: tensor_pb2.Tensor(
            dtype=tensor_pb2.DTYPE_FLOAT32, shape=[rows, HIDDEN],
            shm=tensor_pb2.SharedMemorySpan(offset=64 * at, length=rows * HIDDEN * 4)),
            st.integers(0, 8) if rows is None else rows,
            st.integers(SPAN_ROWS_AT // 64, SEGMENT_BYTES // 64 + 6))  # some past the segment's end
        return st.one_of(plain, valid, valid)

    held_group = st.builds(lambda key, hidden: expert_pb2.ExpertGroup(layer=key[0], expert=key[1], hidden_states=hidden),
                           st.sampled_from(HELD_A), tensor())
    any_group = st.builds(expert_pb2.ExpertGroup, layer=st.one_of(st.integers(0, 2), U32),
                          expert=st.one_of(st.integers(0, 4), U32), hidden_states=tensor())
    group_requests = st.lists(held_group, min_size=1, max_size=4).flatmap(lambda groups: perturbed(
        expert_pb2.ComputeExpertsRequest, dict(groups=groups),
        dict(groups=st.lists(st.one_of(held_group, any_group), max_size=5), traceparent=TEXT)))
    return st.one_of(group_requests, packed_requests(tensor))


def packed_requests(tensor) -> st.SearchStrategy:
    """The packed form (PackedGroups): held experts of one layer with counts summing to the rows of
    `tensor()` (mostly: its rows are drawn to match), a field or two made hostile."""
    @st.composite
    def genuine(draw) -> expert_pb2.ComputeExpertsRequest:
        layer = draw(st.sampled_from(sorted({l for l, _ in HELD_A})))
        experts = draw(st.lists(st.sampled_from([e for l, e in HELD_A if l == layer]), min_size=1, max_size=4))
        counts = draw(st.lists(st.integers(0, 2), min_size=len(experts), max_size=len(experts)))
        packed = draw(perturbed(expert_pb2.PackedGroups, dict(
            layer=layer, experts=experts, num_tokens=counts, hidden_states=draw(tensor(st.just(sum(counts))))),
            dict(layer=st.one_of(st.integers(0, 2), U32), experts=st.lists(st.one_of(st.integers(0, 4), U32), max_size=5),
                 num_tokens=st.lists(st.one_of(st.integers(0, 3), U32), max_size=5), hidden_states=tensor())))
        return draw(perturbed(expert_pb2.ComputeExpertsRequest, dict(packed=packed), dict(
            groups=st.lists(st.builds(expert_pb2.ExpertGroup, layer=st.integers(0, 1), expert=st.integers(0, 3),
                                      hidden_states=tensor()), max_size=2), traceparent=TEXT)))
    return genuine()


def strategy_for(rpc: str) -> st.SearchStrategy:
    return {
        "Expert/ComputeExperts": batches(compute_requests()),
        "Expert/GetExpertInfo": batches(st.just(expert_pb2.GetExpertInfoRequest())),
        "Expert/GetExpertLoad": batches(st.builds(expert_pb2.GetExpertLoadRequest, window_seconds=F32)),
        "Expert/LoadExperts": batches(st.builds(expert_pb2.LoadExpertsRequest, experts=st.lists(KEY, max_size=4))),
        "Expert/DropExperts": batches(st.builds(expert_pb2.DropExpertsRequest, experts=st.lists(KEY, max_size=4),
                                                drain_timeout_seconds=st.one_of(st.floats(0, 1), F32))),
        "DataPlane/OfferDataPlanes": batches(st.just(dataplane_pb2.OfferDataPlanesRequest())),
    }[rpc]


@pytest.fixture(scope="module")
def spare_expert(harness, tiny_moe_model):
    """An expert server outside the mesh (experts-a's experts, not registered anywhere)."""
    config = ServiceConfig(model_dir=tiny_moe_model, name="experts-a", topology=TOPOLOGY)
    server = harness.run(start_expert_server(config))
    yield f"127.0.0.1:{server.port}"
    harness.run(server.stop(grace=None))


async def every_expert_computes(address: str, reference_address: str) -> None:
    """The server at `address` computes every expert of experts-a as the mesh's experts-a does."""
    request = expert_pb2.ComputeExpertsRequest(groups=[
        expert_pb2.ExpertGroup(layer=layer, expert=expert, hidden_states=GOOD) for layer, expert in HELD_A])
    assert await compute_experts(address, request) == await compute_experts(reference_address, request)


@pytest.mark.parametrize("rpc", list(RPCS))
def test_fuzz_expert_rpc(harness, spare_expert, rpc):
    placement_rpc = rpc in ("Expert/LoadExperts", "Expert/DropExperts")
    address = spare_expert if placement_rpc else harness.expert(0)
    counter = Counter()
    channel = harness.run(open_channel(address))

    @FUZZ_SETTINGS
    @given(batch=strategy_for(rpc))
    def fuzz(batch):
        harness.run(send_batch(channel, RPCS[rpc], batch, counter))

    try:
        fuzz()
        if placement_rpc:  # load back whatever was dropped, then check every expert
            load = expert_pb2.LoadExpertsRequest(experts=[router_pb2.ExpertKey(layer=l, expert=e) for l, e in HELD_A])

            async def reload():  # the call is made on the harness's loop (grpc.aio needs a running one)
                return await channel.unary_unary(RPCS["Expert/LoadExperts"].path)(load.SerializeToString(), timeout=60)
            harness.run(reload())
    finally:
        harness.run(channel.close())
    print(rpc, counter.sent, counter.codes)
    assert counter.sent[rpc] >= REQUESTS_PER_RPC, counter.sent
    harness.run(every_expert_computes(address, harness.expert(0)))
    harness.run(harness.expect_serving())



def test_fuzz_shared_memory_plane_compute_experts(harness):
    """ComputeExperts over the shared-memory plane: tensors in the segment at valid and hostile spans."""
    fuzz_shm_calls(harness, harness.expert(0), SHM_METHOD, mangled(compute_requests(span=True)), "shm ComputeExperts")
    harness.run(harness.expect_serving())  # stages reach this expert server over the plane too


def test_fuzz_shared_memory_hello(harness):
    """Hellos with hostile session keys, segment names and sizes, each on a new connection: refused
    with a status naming the field unless key, segment, size and frame version are all genuine; the server
    keeps serving."""
    from shardmesh.shm_segment import Segment
    counter = Counter()
    segment = Segment.create(4096)  # a real segment of ours (kept linked while the test runs)
    channel = harness.run(open_channel(harness.expert(0)))
    offer_stub = dataplane_pb2_grpc.DataPlaneStub(channel)
    hellos = st.tuples(st.booleans(),  # a fresh genuine key, else hostile bytes
                       st.one_of(st.just(segment.name), st.just(segment.name), TEXT,
                                 st.just("shardmesh-" + "0" * 32), st.just("../../dev/zero")),
                       st.one_of(st.just(segment.size), U64), st.binary(max_size=40),
                       st.one_of(st.just(FRAME_VERSION), st.just(FRAME_VERSION), U32))  # how calls are framed

    async def send(batch):
        codes = []
        for fresh, name, size, key, version in batch:
            offer = await offer_stub.OfferDataPlanes(dataplane_pb2.OfferDataPlanesRequest(), timeout=10)
            hello = dataplane_pb2.ShmHello(session_key=offer.shm_session_key if fresh else key, segment=name,
                                           segment_bytes=size, probe=bytes(16), frame_version=version)
            reply = await shm_hello(offer.shm_socket, hello)
            code = next(c for c in grpc.StatusCode if c.value[0] == reply.status_code)
            genuine = fresh and name == segment.name and size == segment.size and version == FRAME_VERSION
            assert (code == grpc.StatusCode.OK) == genuine, (hello, reply)
            check_answer("shm hello", hello.SerializeToString(), code, reply.status_details)
            codes.append(code)
        counter.add("shm hello", codes)

    @FUZZ_SETTINGS
    @given(batch=st.lists(hellos, min_size=10, max_size=10))
    def fuzz(batch):
        harness.run(send(batch))

    try:
        fuzz()
    finally:
        harness.run(channel.close())
        segment.close()
    print(counter.sent, counter.codes)
    assert counter.sent["shm hello"] >= REQUESTS_PER_RPC
    harness.run(harness.expect_serving())
