"""Bad input to the load and placement RPCs (Expert.GetExpertLoad/LoadExperts/DropExperts,
Router.GetClusterStatus's load window, Admin.Rebalance): a precise status naming the field,
nothing changed, and the mesh keeps serving."""

import math

import pytest

from bad_input_harness import (FAILED, INVALID, NOT_FOUND, assert_status, call_error, harness,  # noqa: F401
                               hidden_states, tiny_moe_model)
from shardmesh import grpc_util
from shardmesh.v1 import admin_pb2, admin_pb2_grpc, expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc

Key = router_pb2.ExpertKey  # the tiny model: 2 layers x 4 experts; experts-a holds layer 0 and (1, 0), (1, 1)

BAD_EXPERT_CALLS = {
    "load_window_negative": ("GetExpertLoad", expert_pb2.GetExpertLoadRequest(window_seconds=-1), INVALID, "window_seconds"),
    "load_window_too_long": ("GetExpertLoad", expert_pb2.GetExpertLoadRequest(window_seconds=601), INVALID, "window_seconds"),
    "load_window_nan": ("GetExpertLoad", expert_pb2.GetExpertLoadRequest(window_seconds=math.nan), INVALID, "window_seconds"),
    "load_layer_out_of_range": ("LoadExperts", expert_pb2.LoadExpertsRequest(experts=[Key(layer=0), Key(layer=2)]),
                                INVALID, "experts[1].layer"),
    "load_expert_out_of_range": ("LoadExperts", expert_pb2.LoadExpertsRequest(experts=[Key(layer=1, expert=4)]),
                                 INVALID, "experts[0].expert"),
    "drop_not_held": ("DropExperts", expert_pb2.DropExpertsRequest(experts=[Key(layer=0, expert=0), Key(layer=1, expert=3)]),
                      NOT_FOUND, "experts[1]"),
    "drop_out_of_range": ("DropExperts", expert_pb2.DropExpertsRequest(experts=[Key(layer=7)]), INVALID, "experts[0].layer"),
    "drop_timeout_negative": ("DropExperts", expert_pb2.DropExpertsRequest(experts=[Key()], drain_timeout_seconds=-1),
                              INVALID, "drain_timeout_seconds"),
}


async def expert_call(address: str, method: str, request):
    async with grpc_util.insecure_channel(address) as channel:
        return await getattr(expert_pb2_grpc.ExpertStub(channel), method)(request, timeout=30)


async def held(address: str) -> set[tuple[int, int]]:
    info = await expert_call(address, "GetExpertInfo", expert_pb2.GetExpertInfoRequest())
    return {(k.layer, k.expert) for k in info.experts}


@pytest.mark.parametrize("case", sorted(BAD_EXPERT_CALLS))
def test_bad_expert_placement_calls(harness, case):
    method, request, code, field = BAD_EXPERT_CALLS[case]

    async def main():
        address = harness.expert(0)
        before = await held(address)
        async with grpc_util.insecure_channel(address) as channel:
            error = await call_error(getattr(expert_pb2_grpc.ExpertStub(channel), method)(request, timeout=30))
        assert_status(error, code, field)
        assert await held(address) == before
        await harness.expect_serving()

    harness.run(main())


def test_load_compute_drop_round_trip_on_an_expert_server(harness):
    """experts-b holds no expert of layer 0: load one, compute with it, drop it again."""
    async def main():
        address = harness.expert(1)
        assert (0, 2) not in await held(address)
        info = await expert_call(address, "LoadExperts", expert_pb2.LoadExpertsRequest(experts=[Key(layer=0, expert=2)]))
        assert (0, 2) in {(k.layer, k.expert) for k in info.experts}
        group = expert_pb2.ExpertGroup(layer=0, expert=2, hidden_states=hidden_states(3))
        reply = await expert_call(address, "ComputeExperts", expert_pb2.ComputeExpertsRequest(groups=[group]))
        assert len(reply.outputs) == 1 and list(reply.outputs[0].shape) == [3, 32]
        load = await expert_call(address, "GetExpertLoad", expert_pb2.GetExpertLoadRequest())
        assert {(t.layer, t.expert): t.tokens for t in load.tokens}[(0, 2)] == 3
        await expert_call(address, "DropExperts", expert_pb2.DropExpertsRequest(experts=[Key(layer=0, expert=2)]))
        assert (0, 2) not in await held(address)
        await harness.expect_serving()

    harness.run(main())


def rebalance_cases(addresses: dict[str, str]) -> dict:
    a, b = addresses["experts-a"], addresses["experts-b"]
    everything = [Key(layer=l, expert=e) for l in range(2) for e in range(4)]
    Target = admin_pb2.ServerExperts
    return {
        "window": (admin_pb2.RebalanceRequest(load_window_seconds=-3), INVALID, "load_window_seconds"),
        "min_gain": (admin_pb2.RebalanceRequest(min_gain=1.5), INVALID, "min_gain"),
        "drain_unknown": (admin_pb2.RebalanceRequest(drain=["experts-a", "nope"]), INVALID, "drain[1]"),
        "drain_all": (admin_pb2.RebalanceRequest(drain=["experts-a", b]), FAILED, "drain"),
        "slots_too_few": (admin_pb2.RebalanceRequest(slots_per_server=3), FAILED, "slots_per_server"),
        "target_unknown_address": (admin_pb2.RebalanceRequest(target=[Target(address=a, experts=everything),
                                                                      Target(address="10.9.9.9:1")]),
                                   INVALID, "target[1].address"),
        "target_out_of_range": (admin_pb2.RebalanceRequest(target=[Target(address=a, experts=[Key(layer=0, expert=9)])]),
                                INVALID, "target[0].experts[0]"),
        "target_incomplete": (admin_pb2.RebalanceRequest(target=[Target(address=a, experts=everything[:-1])]),
                              INVALID, "target"),
        "target_on_drained": (admin_pb2.RebalanceRequest(drain=["experts-b"], target=[
            Target(address=a, experts=everything), Target(address=b, experts=everything[:1])]),
            INVALID, "target[1].experts"),
    }


def test_bad_rebalance_requests_change_nothing(harness):
    async def main():
        async with grpc_util.insecure_channel(harness.mesh.address) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            status = await router.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=10)
            error = await call_error(router.GetClusterStatus(
                router_pb2.GetClusterStatusRequest(include_expert_load=True, load_window_seconds=601), timeout=10))
            assert_status(error, INVALID, "load_window_seconds")
            addresses = {s.name: s.address for s in status.servers}
            before = {name: await held(addresses[name]) for name in ("experts-a", "experts-b")}
            for case, (request, code, field) in rebalance_cases(addresses).items():
                error = await call_error(admin_pb2_grpc.AdminStub(channel).Rebalance(request, timeout=60))
                assert_status(error, code, field)
                after = await router.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=10)
                assert after.placement_version == status.placement_version, case
            assert {name: await held(addresses[name]) for name in before} == before
        await harness.expect_serving()

    harness.run(main())
