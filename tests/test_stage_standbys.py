"""Stage standbys in the topology and the cluster map: parsing, the registration rules, which
server is active, dropping a dead one, and what the router reports it cannot serve."""

import pytest

from shardmesh.config import ModelConfig
from shardmesh.errors import FailedPrecondition
from shardmesh.topology import Topology
from shardmesh.v1 import router_pb2

from router.cluster import ClusterMap

DENSE = ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                    max_position_embeddings=64, tie_word_embeddings=False, num_experts=0, experts_per_token=0)
TOPOLOGY = """
[[stage]]
name = "s0"
layers = [0, 2]

[[stage]]
name = "s1"
layers = [2, 4]
standbys = 2
"""


def register(cluster: ClusterMap, name: str, address: str, replica_id: str = "", layers=None):
    start, end = layers or next((s.start_layer, s.end_layer) for s in cluster.topology.stages if s.name == name)
    return cluster.register(router_pb2.RegisterServerRequest(
        name=name, role=router_pb2.SERVER_ROLE_STAGE, address=address, replica_id=replica_id,
        layers=router_pb2.LayerRange(start=start, end=end), model_fingerprint=DENSE.fingerprint))


def test_standbys_parse_round_trip_and_replica_ids():
    topology = Topology.from_toml(TOPOLOGY, DENSE.num_layers).validate(DENSE)
    assert [s.standbys for s in topology.stages] == [0, 2]
    assert topology.stages[1].replica_ids() == ["", "standby-1", "standby-2"]
    assert Topology.from_toml(topology.to_toml(), DENSE.num_layers) == topology


def test_standbys_of_a_tensor_parallel_stage_are_refused():
    topology = Topology.from_toml(TOPOLOGY.replace("standbys = 2", "standbys = 1\ntp = 2"), DENSE.num_layers)
    with pytest.raises(ValueError, match="standbys 1 must be >= 0, and 0 for a tensor-parallel stage"):
        topology.validate(DENSE)
    with pytest.raises(ValueError, match="standbys -1"):
        Topology.from_toml(TOPOLOGY.replace("standbys = 2", "standbys = -1"), DENSE.num_layers).validate(DENSE)


def test_first_registered_is_active_standbys_follow_and_take_over():
    cluster = ClusterMap(Topology.from_toml(TOPOLOGY, DENSE.num_layers), DENSE)
    assert cluster.unservable() == ["stage 's0' (layers [0, 2)) has not registered yet",
                                    "stage 's1' (layers [2, 4)) has not registered yet"]
    register(cluster, "s0", "127.0.0.1:1000")
    register(cluster, "s1", "127.0.0.1:2002", "standby-2")  # whoever registers first is active
    register(cluster, "s1", "127.0.0.1:2000")
    register(cluster, "s1", "127.0.0.1:2001", "standby-1")
    assert cluster.unservable() == []
    assert cluster.stage_addresses() == [("s0", "127.0.0.1:1000"), ("s1", "127.0.0.1:2002")]
    assert cluster.stage_addresses(standbys=True) == [("s0", "127.0.0.1:1000"), ("s1", "127.0.0.1:2002"),
                                                      ("s1", "127.0.0.1:2000"), ("s1", "127.0.0.1:2001")]
    assert cluster.drop_replica("s1", "127.0.0.1:2002", "stopped answering") == "127.0.0.1:2000"
    assert cluster.drop_replica("s1", "127.0.0.1:2000", "stopped answering") == "127.0.0.1:2001"
    assert cluster.drop_replica("s1", "127.0.0.1:2001", "stopped answering (UNAVAILABLE)") == ""
    assert cluster.unservable() == ["stage 's1' (layers [2, 4)) has no live server: "
                                    "127.0.0.1:2001 stopped answering (UNAVAILABLE)"]
    register(cluster, "s1", "127.0.0.1:2003", "standby-1")  # one comes back: servable again
    assert cluster.unservable() == [] and cluster.stage_addresses()[1] == ("s1", "127.0.0.1:2003")


def test_replica_id_of_a_stage_without_standbys_is_refused():
    cluster = ClusterMap(Topology.from_toml(TOPOLOGY, DENSE.num_layers), DENSE)
    with pytest.raises(FailedPrecondition, match="standbys = 0") as refused:
        register(cluster, "s0", "127.0.0.1:1000", "standby-1")
    assert refused.value.field == "replica_id"
    with pytest.raises(FailedPrecondition, match="holds \\[0, 2\\]"):
        register(cluster, "s1", "127.0.0.1:2000", "standby-1", layers=(0, 2))  # a standby of other layers
