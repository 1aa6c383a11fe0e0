"""Split experts with deadlines and failover as whole experts have (stage_server/split_experts.py):
a slice whose server fails (refused, or silent past its per-call deadline) is sent again within
the same step to another replica of that slice; a slice with no live replica fails fast with
UNAVAILABLE; the router places every reachable replica of each slice and shows split experts in
GetClusterStatus. Expert servers run in this process on loopback."""

import asyncio
import dataclasses
import time

import grpc
import pytest
import torch

from oracle import assert_logits_close
from router.cluster import ClusterMap
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.errors import InvalidArgument, Unavailable
from shardmesh.expert_model import ExpertShard
from shardmesh.service_config import ServiceConfig
from shardmesh.v1 import expert_pb2_grpc, router_pb2, stage_pb2
from stage_server.remote_experts import RemoteExperts
from stage_server.servicer import check_address
from stage_server.split_experts import SplitExperts, slice_replicas
from test_expert_failover import closed_port_address
from test_split_expert import split_topology


class SilentExpert(expert_pb2_grpc.ExpertServicer):
    """An expert server that accepts calls and never answers (frozen)."""

    def __init__(self):
        self.calls = 0

    async def ComputeExperts(self, request, context):
        self.calls += 1
        await asyncio.Event().wait()


async def start_silent() -> tuple[grpc.aio.Server, str, SilentExpert]:
    server, servicer = grpc.aio.server(), SilentExpert()
    expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", servicer


def test_a_failed_slice_goes_to_another_replica_within_its_deadline(mixtral_dir):
    from expert_server.main import start_expert_server

    config = ModelConfig.from_dir(mixtral_dir)
    topology = split_topology(config.num_layers, config.num_experts, 2).validate(config)
    hidden_states = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(4))  # [n, H]
    whole = ExpertShard(config, [(1, 2)], CheckpointReader(mixtral_dir)).compute(1, 2, hidden_states)

    async def main():
        base = ServiceConfig(model_dir=mixtral_dir, topology=topology, data_plane="grpc")
        big = [await start_expert_server(dataclasses.replace(base, name=n)) for n in ("big-0", "big-1")]
        silent, silent_address, silent_servicer = await start_silent()
        split = SplitExperts(RemoteExperts(data_plane="grpc"))
        split.inner.deadline = lambda rows: 1.0  # the per-call deadline both backends use (5 s + work by default)
        try:
            live = [f"127.0.0.1:{s.port}" for s in big]
            dead = closed_port_address()
            # Slice 0: a refusing replica and the live one; slice 1: the live one and a silent one.
            split.update({(1, 2): ((dead, live[0]), (live[1], silent_address))})
            split._turn = -1  # replicas are picked in turn: index 0 for slice 0, 1 for slice 1 (the failing ones)
            started = time.monotonic()
            outputs = await split.run(1, {2: hidden_states})
            elapsed = time.monotonic() - started
            assert split.failovers == 2 and silent_servicer.calls == 1
            # The silent replica costs its 1 s deadline, not a fixed 30 s; 15 s: a loaded machine.
            assert 0.9 < elapsed < 15, elapsed
            again = await split.run(1, {2: hidden_states})  # the failed replicas are avoided meanwhile
            assert split.failovers == 2 and silent_servicer.calls == 1
            # Every replica of slice 1 fails: UNAVAILABLE naming the cause, within the attempts' deadlines.
            split.update({(1, 2): ((live[0],), (dead, closed_port_address()))})
            with pytest.raises(Unavailable, match="no replica of a split expert's slice answered"):
                await split.run(1, {2: hidden_states})
            return outputs[2], again[2]
        finally:
            await split.close()
            await silent.stop(grace=None)
            for server in big:
                await server.stop(grace=None)

    output, again = asyncio.run(asyncio.wait_for(main(), 120))
    assert_logits_close(output, whole, context="split expert after failover vs the whole expert")
    assert torch.equal(output, again)


def test_placement_lists_every_reachable_replica_of_each_slice_and_status_shows_split_experts(mixtral_dir):
    config = ModelConfig.from_dir(mixtral_dir)
    topology = split_topology(config.num_layers, config.num_experts, 2).validate(config)
    cluster = ClusterMap(topology, config)

    def register(name: str, address: str, replica_id: str = "") -> None:
        spec = topology.server(name)
        cluster.register(router_pb2.RegisterServerRequest(
            name=name, role=router_pb2.SERVER_ROLE_EXPERT, address=address, replica_id=replica_id,
            model_fingerprint=config.fingerprint, experts=[router_pb2.ExpertKey(layer=l, expert=e) for l, e in spec.experts],
            expert_slices=[router_pb2.ExpertSliceKey(layer=k.layer, expert=k.expert, rank=k.rank, count=k.tp)
                           for k in spec.slices]))

    register("experts-0", "h:1")
    register("big-0", "h:10")
    register("big-0", "h:11", replica_id="second")
    register("big-1", "h:20")
    cluster.set_reachable("h:10", False)
    location = next(loc for loc in cluster.placement().locations if (loc.layer, loc.expert) == (1, 2))
    assert list(location.slice_addresses) == ["h:11", "h:20"] and not location.addresses
    assert [list(r.addresses) for r in location.slice_replicas] == [["h:11"], ["h:20"]]
    cluster.set_reachable("h:10", True)
    location = next(loc for loc in cluster.placement().locations if (loc.layer, loc.expert) == (1, 2))
    assert [list(r.addresses) for r in location.slice_replicas] == [["h:10", "h:11"], ["h:20"]]
    assert slice_replicas(location, "locations[0]", check_address) == (("h:10", "h:11"), ("h:20",))

    cluster.set_reachable("h:11", False)
    status = cluster.status(serving=True, active_sequences=0)
    assert len(status.split_experts) == config.num_layers * 4  # experts 0-3 of every layer
    split = next(s for s in status.split_experts if (s.layer, s.expert) == (1, 2))
    assert [(s.rank, s.server, list(s.addresses), list(s.unreachable_addresses)) for s in split.slices] == [
        (0, "big-0", ["h:10", "h:11"], ["h:11"]), (1, "big-1", ["h:20"], [])]
    big1 = next(s for s in status.servers if s.name == "big-1")
    assert router_pb2.ExpertSliceKey(layer=1, expert=2, rank=1, count=2) in big1.expert_slices
    stages_missing = cluster.unservable()  # no stage registered here: only those
    assert all("has not registered yet" in reason for reason in stages_missing)
    cluster.set_reachable("h:10", False)  # no replica of slice 0 left
    assert cluster.unservable() == stages_missing + [
        f"expert server 'big-0' holds slices of {config.num_layers * 4} split experts and no replica of it is "
        "reachable (h:10, h:11)"]


@pytest.mark.parametrize("change, field", [
    (dict(slice_replicas=[stage_pb2.SliceReplicas(addresses=["h:1"])]), "locations[3].slice_replicas"),
    (dict(slice_replicas=[stage_pb2.SliceReplicas(addresses=["h:1"]),
                          stage_pb2.SliceReplicas(addresses=["h:2", "bad host:1"])]),
     "locations[3].slice_replicas[1].addresses[1]"),
    (dict(slice_addresses=["h:1"]), "locations[3].slice_addresses"),
    (dict(addresses=["h:9"]), "locations[3].slice_addresses"),
])
def test_bad_slice_replicas_are_refused_naming_the_field(change, field):
    location = stage_pb2.ExpertLocation(layer=0, expert=1, slice_addresses=["h:1", "h:2"])
    for key, value in change.items():
        location.ClearField(key)
        getattr(location, key).extend(value)
    with pytest.raises(InvalidArgument) as caught:
        slice_replicas(location, "locations[3]", check_address)
    assert caught.value.field == field
