"""Property-based hostile input to the router's port (Router, Registry, Admin): at least
REQUESTS_PER_RPC generated requests to each RPC over the real wire (fuzz_strategies.py), none
answered UNKNOWN, INTERNAL or by a hang, every refusal naming its field, and afterwards the mesh
still generates the reference tokens. One in-process mesh for the module (bad_input_harness)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bad_input_harness import (MAX_CONTEXT, TOPOLOGY, VOCAB, harness, tiny_moe_model)  # noqa: F401  (fixtures)
from fuzz_strategies import (ENUM, F32, FUZZ_SETTINGS, I64, REQUESTS_PER_RPC, TEXT, U32, U64, Counter,
                             address_strategy, batches, open_channel, perturbed, send_batch)
from shardmesh.v1 import admin_pb2, router_pb2
from wire_helpers import rpcs_of

RPCS = {rpc.name: rpc for rpc in rpcs_of("router")}
TOKEN_ID = st.one_of(st.integers(0, VOCAB - 1), I64)


def generate_requests() -> st.SearchStrategy:
    """Valid prompts with hostile sampling, limits and stop tokens, one field at a time (the valid
    ones generate one or two tokens, so that 2,000 stay cheap)."""
    sampling = st.builds(router_pb2.SamplingParams, temperature=st.one_of(st.floats(0, 4), F32),
                         top_k=st.one_of(st.integers(0, VOCAB + 1), U32),
                         top_p=st.one_of(st.none(), st.floats(0, 1), F32), seed=st.one_of(st.none(), U64))
    valid_prompt = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
    hostile = dict(prompt_token_ids=st.lists(TOKEN_ID, max_size=MAX_CONTEXT + 2), prompt_text=TEXT,
                   max_new_tokens=st.one_of(st.integers(0, 3), st.sampled_from([MAX_CONTEXT, MAX_CONTEXT + 1, 2**32 - 1])),
                   stop_token_ids=st.lists(TOKEN_ID, max_size=3), sampling=sampling)
    mostly_valid = st.builds(lambda prompt, new, sampling, stop, ignore_eos, logits: dict(
        prompt_token_ids=prompt, max_new_tokens=new, sampling=sampling, stop_token_ids=stop, ignore_eos=ignore_eos,
        return_logits=logits), valid_prompt, st.sampled_from([1, 1, 1, 2]), st.one_of(st.none(), sampling),
        st.lists(st.integers(0, VOCAB - 1), max_size=3), st.booleans(), st.booleans())
    return mostly_valid.flatmap(lambda genuine: perturbed(router_pb2.GenerateRequest, genuine, hostile, most=1))


def keys(layers=st.one_of(st.integers(0, 2), U32), experts=st.one_of(st.integers(0, 4), U32)):
    return st.lists(st.builds(router_pb2.ExpertKey, layer=layers, expert=experts), max_size=10)


def registrations(harness) -> st.SearchStrategy:
    """The genuine registration of a server of the topology with up to two hostile fields (never a
    live address other than the server's own: re-pointing a server elsewhere is what an
    authenticated registration may do, and would stop the mesh by design)."""
    from test_bad_input import genuine_registration
    names = [s.name for s in (*TOPOLOGY.stages, *TOPOLOGY.expert_servers)]

    def hostile(name: str) -> dict:
        return dict(name=st.sampled_from([n for n in names if n != name] + ["", "stage-9", "x" * 100]),
                    role=ENUM, address=address_strategy([_address_of(harness, name)]),
                    layers=st.one_of(st.none(), st.builds(router_pb2.LayerRange, start=U32, end=U32)),
                    experts=keys(), model_fingerprint=st.one_of(st.sampled_from(["", "0" * 16]), TEXT),
                    replica_id=st.one_of(st.just(""), TEXT), **newer_fields())
    return st.sampled_from(names).flatmap(lambda name: perturbed(
        router_pb2.RegisterServerRequest, genuine_registration(harness, name), hostile(name)))


def newer_fields() -> dict:
    """Hostile values of RegisterServerRequest fields that not every version of the proto has."""
    fields = router_pb2.RegisterServerRequest.DESCRIPTOR.fields_by_name
    candidates = dict(placement_version=U64, holds_assignment=st.booleans())
    if "expert_slices" in fields:
        candidates["expert_slices"] = st.lists(st.builds(
            router_pb2.ExpertSliceKey, layer=U32, expert=U32, rank=U32, count=U32), max_size=3)
    return {name: strategy for name, strategy in candidates.items() if name in fields}


def _address_of(harness, name: str) -> str | None:
    mesh = harness.mesh
    for spec, server in zip(TOPOLOGY.stages, mesh.stages):
        if spec.name == name:
            return f"127.0.0.1:{server.port}"
    for spec, server in zip(TOPOLOGY.expert_servers, mesh.experts):
        if spec.name == name:
            return f"127.0.0.1:{server.port}"
    return None


def rebalances(harness) -> st.SearchStrategy:
    experts = [f"127.0.0.1:{server.port}" for server in harness.mesh.experts]
    servers = st.builds(admin_pb2.ServerExperts, address=address_strategy(experts), name=TEXT, experts=keys())
    return st.builds(admin_pb2.RebalanceRequest, load_window_seconds=F32, slots_per_server=U32,
                     drain=st.lists(st.one_of(st.sampled_from(["experts-a", "experts-b", *experts]), TEXT), max_size=3),
                     target=st.lists(servers, max_size=3), dry_run=st.booleans(), min_gain=F32)


def removals(harness) -> st.SearchStrategy:
    """Every expert server of the harness is its topology entry's last replica: every removal is refused."""
    experts = [f"127.0.0.1:{server.port}" for server in harness.mesh.experts]
    return st.builds(admin_pb2.RemoveServerRequest, address=st.one_of(st.sampled_from(experts), TEXT))


def strategy_for(harness, rpc: str) -> st.SearchStrategy:
    return {
        "Router/Generate": generate_requests(),
        "Router/GetModelInfo": st.just(router_pb2.GetModelInfoRequest()),
        "Router/GetClusterStatus": st.builds(router_pb2.GetClusterStatusRequest, include_expert_load=st.booleans(),
                                             load_window_seconds=F32),
        "Registry/RegisterServer": registrations(harness),
        "Admin/Rebalance": rebalances(harness),
        "Admin/RemoveServer": removals(harness),
    }[rpc]


async def reregister_everyone(harness) -> None:
    """Undo what valid fuzzed registrations did (each server registers itself again, as genuine)."""
    from test_bad_input import genuine_registration
    from shardmesh import grpc_util
    from shardmesh.v1 import router_pb2_grpc
    async with grpc_util.insecure_channel(harness.mesh.address) as channel:
        registry = router_pb2_grpc.RegistryStub(channel)
        for spec in (*TOPOLOGY.stages, *TOPOLOGY.expert_servers):
            request = router_pb2.RegisterServerRequest(**genuine_registration(harness, spec.name))
            await registry.RegisterServer(request, timeout=10)


# Rebalance last: after a live placement change the servers no longer hold their topology's
# experts, so a genuine re-registration (which says "restarted, holding the topology's experts")
# could not restore the mesh any more.
RPCS_FUZZED = ["Router/Generate", "Router/GetModelInfo", "Router/GetClusterStatus", "Registry/RegisterServer",
               "Admin/RemoveServer", "Admin/Rebalance"]


@pytest.mark.parametrize("rpc", RPCS_FUZZED)
def test_fuzz_router_rpc(harness, rpc):
    counter = Counter()
    channel = harness.run(open_channel(harness.mesh.address))

    @FUZZ_SETTINGS
    @given(batch=batches(strategy_for(harness, rpc)))
    def fuzz(batch):
        harness.run(send_batch(channel, RPCS[rpc], batch, counter))

    try:
        fuzz()
    finally:
        harness.run(channel.close())
    print(rpc, counter.sent, counter.codes)
    assert counter.sent[rpc] >= REQUESTS_PER_RPC, counter.sent
    if rpc == "Registry/RegisterServer":
        harness.run(reregister_everyone(harness))
    harness.run(harness.expect_serving())



def test_every_router_port_rpc_is_fuzzed():
    """A new RPC on the router's port must be added above (health and reflection are grpc's own)."""
    ours = {name for name in RPCS if not name.startswith(("Health/", "ServerReflection/"))}
    assert ours == set(RPCS_FUZZED)
