"""Property-based hostile input to stage servers (Step, FreeSequences, UpdatePlacement,
GetStageInfo, DataPlane.OfferDataPlanes), as a buggy or hostile router would send it: at least
REQUESTS_PER_RPC generated requests to each over the real wire (fuzz_strategies.py), none answered
UNKNOWN, INTERNAL or by a hang, every refusal naming its field; afterwards the mesh still
generates the reference tokens. One in-process mesh for the module (bad_input_harness)."""

import asyncio

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bad_input_harness import (BAD_SEQUENCE_ID, HIDDEN, MAX_POSITIONS, VOCAB, harness,  # noqa: F401  (fixtures)
                               tiny_moe_model)
from fuzz_strategies import (FUZZ_SETTINGS, REQUESTS_PER_RPC, TEXT, U32, U64, Counter, address_strategy, batches,
                             check_answer, mangled, open_channel, perturbed, send_batch, tensors)
from shardmesh import grpc_util
from shardmesh.v1 import dataplane_pb2, stage_pb2, stage_pb2_grpc
from wire_helpers import Rpc

STAGE = "/shardmesh.v1.Stage/"
RPCS = {name: Rpc(STAGE + name.split("/")[1], name == "Stage/Step", name == "Stage/Step")
        for name in ["Stage/Step", "Stage/FreeSequences", "Stage/UpdatePlacement", "Stage/GetStageInfo"]}
RPCS["DataPlane/OfferDataPlanes"] = Rpc("/shardmesh.v1.DataPlane/OfferDataPlanes", False, False)
SEQUENCE_ID = st.one_of(st.integers(BAD_SEQUENCE_ID, BAD_SEQUENCE_ID + 7), U64)
NUM_TOKENS = st.one_of(st.integers(1, 6), st.integers(0, MAX_POSITIONS + 2), U32)


@st.composite
def step_streams(draw, first: bool) -> list[bytes]:
    """One Step stream: a mostly valid first step (new sequences, the right tensor) with a field or
    two made hostile, and maybe a second step continuing (or pretending to continue) them."""
    # New sequences (ids drawn from a wide range: one already cached would be refused at start 0);
    # restore() frees them all afterwards.
    slices = draw(st.lists(st.tuples(st.integers(BAD_SEQUENCE_ID, BAD_SEQUENCE_ID + 2**40), st.integers(1, 4)),
                           min_size=1, max_size=3, unique_by=lambda s: s[0]))
    count = sum(n for _, n in slices)
    right = ("right",)  # the genuine step's tensor; `hostile` below brings the wrong ones
    inputs = dict(token_ids=tensors(rows=st.just(count), kind="ids", modes=right)) if first else dict(
        hidden_states=tensors(rows=st.just(count), width=HIDDEN, modes=right))
    genuine = dict(step_id=1, sequences=[stage_pb2.SequenceSlice(sequence_id=i, start_position=0, num_tokens=n)
                                         for i, n in slices])
    genuine.update({name: draw(strategy) for name, strategy in inputs.items()})
    sequence = st.builds(stage_pb2.SequenceSlice, sequence_id=SEQUENCE_ID, start_position=U32, num_tokens=NUM_TOKENS)
    hostile = dict(step_id=U64, sequences=st.lists(sequence, max_size=4), traceparent=TEXT,
                   token_ids=st.one_of(st.none(), tensors(kind="ids")),
                   hidden_states=st.one_of(st.none(), tensors(width=HIDDEN)))
    stream = [draw(mangled(perturbed(stage_pb2.StepRequest, genuine, hostile)))]
    if draw(st.booleans()):  # the next step of the same sequences, one token each
        following = dict(step_id=2, sequences=[stage_pb2.SequenceSlice(sequence_id=i, start_position=n, num_tokens=1)
                                               for i, n in slices])
        following.update({name: draw(tensors(rows=st.just(len(slices)), width=HIDDEN, kind="ids" if first else "float",
                                             modes=right)) for name in inputs})
        stream.append(draw(mangled(perturbed(stage_pb2.StepRequest, following, hostile, most=1))))
    return stream


def placements(harness) -> st.SearchStrategy:
    """The router's genuine placement with hostile versions, addresses and locations."""
    genuine = harness.mesh.router.state.cluster.placement()
    experts = sorted({a for location in genuine.locations for a in location.addresses})
    location = st.builds(stage_pb2.ExpertLocation, layer=st.one_of(st.integers(0, 2), U32),
                         expert=st.one_of(st.integers(0, 4), U32), addresses=st.lists(address_strategy(experts), max_size=3))

    @st.composite
    def one(draw):
        locations = list(genuine.locations)
        for _ in range(draw(st.integers(0, 2))):
            how = draw(st.sampled_from(["drop", "add", "replace"]))
            at = draw(st.integers(0, len(locations) - 1)) if locations else 0
            if how == "drop" and locations:
                locations.pop(at)
            elif how == "add":
                locations.insert(at, draw(location))
            elif locations:
                locations[at] = stage_pb2.ExpertLocation(layer=locations[at].layer, expert=locations[at].expert,
                                                         addresses=draw(st.lists(address_strategy(experts), max_size=3)))
        return stage_pb2.ExpertPlacement(version=draw(st.one_of(st.just(genuine.version), U64)), locations=locations)
    return one()


async def send_streams(channel, streams: list[list[bytes]], counter: Counter) -> None:
    """Each stream of raw StepRequests on its own Step call, all concurrently; check each answer."""
    rpc = RPCS["Stage/Step"]

    async def one(stream):
        # As the router does: one request, then its response, then the next. (Writing on while the
        # server ends the call makes grpc's client report "Internal error from Core" instead of
        # the server's status: a client-side quirk of bidi calls, not the server's answer.)
        call = channel.stream_stream(rpc.path)(timeout=20)
        try:
            for request in stream:
                await call.write(request)
                if await call.read() is grpc.aio.EOF:
                    break
            else:
                await call.done_writing()
            return await call.code(), await call.details() or ""
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""

    answers = await asyncio.gather(*(one(stream) for stream in streams))
    for stream, (code, details) in zip(streams, answers):
        check_answer(rpc.name, b"|".join(stream), code, details)
    counter.add(rpc.name, [code for code, _ in answers])



def strategy_for(harness, rpc: str, first: bool):
    return {
        "Stage/Step": st.lists(step_streams(first), min_size=10, max_size=10),
        "Stage/FreeSequences": batches(st.builds(stage_pb2.FreeSequencesRequest, sequence_ids=st.lists(SEQUENCE_ID))),
        "Stage/UpdatePlacement": batches(placements(harness)),
        "Stage/GetStageInfo": batches(st.just(stage_pb2.GetStageInfoRequest())),
        "DataPlane/OfferDataPlanes": batches(st.just(dataplane_pb2.OfferDataPlanesRequest())),
    }[rpc]


async def restore(harness) -> None:
    """Undo what valid fuzzed requests did: free the sequences they created, and put the router's
    placement back on every stage (as a version no older than the one a fuzzed request left)."""
    placement = harness.mesh.router.state.cluster.placement()
    for index in range(len(harness.mesh.stages)):
        async with grpc_util.insecure_channel(harness.stage(index)) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            info = await stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
            await stub.FreeSequences(stage_pb2.FreeSequencesRequest(sequence_ids=info.cached_sequence_ids), timeout=10)
            restored = stage_pb2.ExpertPlacement(version=max(placement.version, info.placement_version),
                                                 locations=placement.locations)
            await stub.UpdatePlacement(restored, timeout=10)


# Step on both stages (the first takes token_ids, the last hidden states); the rest on one stage
# (the same code serves both).
CASES = [("Stage/Step", 0), ("Stage/Step", 1), *((rpc, 0) for rpc in RPCS if rpc != "Stage/Step")]


@pytest.mark.parametrize("rpc,stage", CASES)
def test_fuzz_stage_rpc(harness, rpc, stage):
    counter = Counter()
    channel = harness.run(open_channel(harness.stage(stage)))
    sender = send_streams if rpc == "Stage/Step" else (
        lambda ch, batch, c: send_batch(ch, RPCS[rpc], batch, c))

    @FUZZ_SETTINGS
    @given(batch=strategy_for(harness, rpc, first=stage == 0))
    def fuzz(batch):
        harness.run(sender(channel, batch, counter))

    try:
        fuzz()
    finally:
        harness.run(channel.close())
    print(rpc, stage, counter.sent, counter.codes)
    assert counter.sent[rpc] >= REQUESTS_PER_RPC, counter.sent
    harness.run(restore(harness))
    harness.run(harness.expect_serving())


def test_fuzz_shared_memory_plane_step(harness):
    """Step over the shared-memory plane (the router's path to a stage on its host): one Step
    stream per session, fed hostile steps one call at a time (a refused step ends that stream; the
    next call opens another)."""
    from fuzz_shm import fuzz_shm_calls
    steps = step_streams(first=False).map(lambda stream: stream[0])
    fuzz_shm_calls(harness, harness.stage(1), "shardmesh.v1.Stage/Step", steps, "shm Step")
    harness.run(restore(harness))
    harness.run(harness.expect_serving())
