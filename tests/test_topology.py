"""Topology files: parsing, validation against the model, the default, TOML round trip."""

import dataclasses

import pytest

from shardmesh.config import ModelConfig
from shardmesh.topology import Topology

MOE = ModelConfig(family="mixtral", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                  max_position_embeddings=64, tie_word_embeddings=False, num_experts=8, experts_per_token=2)
DENSE = dataclasses.replace(MOE, family="llama", num_experts=0, experts_per_token=0)


def test_parse_and_replicas():
    text = """
[[stage]]
name = "s0"
layers = [0, 2]
[[stage]]
name = "s1"
layers = [2, 5]
[[expert_server]]
name = "a"
experts = [0, 1, 2, 3, 4]
[[expert_server]]
name = "b"
experts = [4, 5, 6, 7]
"""
    topology = Topology.from_toml(text, MOE.num_layers).validate(MOE)
    assert [(s.start_layer, s.end_layer) for s in topology.stages] == [(0, 2), (2, 5)]
    replicas = topology.replicas()
    assert replicas[(3, 4)] == ["a", "b"]
    assert replicas[(0, 0)] == ["a"]
    assert len(replicas) == 5 * 8


@pytest.mark.parametrize("stages, message", [
    ("[[stage]]\nname='s0'\nlayers=[0,2]\n[[stage]]\nname='s1'\nlayers=[3,5]", "must start at 2"),
    ("[[stage]]\nname='s0'\nlayers=[0,4]", "cover [0, 4)"),
    ("[[stage]]\nname='s0'\nlayers=[0,5]\n[[stage]]\nname='s0'\nlayers=[5,5]", "unique"),
])
def test_bad_stage_ranges(stages, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        Topology.from_toml(stages, DENSE.num_layers).validate(DENSE)


def test_missing_expert_is_refused():
    text = "[[stage]]\nname='s'\nlayers=[0,5]\n[[expert_server]]\nname='a'\nexperts=[0,1,2,3,4,5,6]"
    with pytest.raises(ValueError, match="no expert server holds"):
        Topology.from_toml(text, MOE.num_layers).validate(MOE)


def test_expert_out_of_range_is_refused():
    text = "[[stage]]\nname='s'\nlayers=[0,5]\n[[expert_server]]\nname='a'\nexperts=[0,1,2,3,4,5,6,7,8]"
    with pytest.raises(ValueError, match="outside"):
        Topology.from_toml(text, MOE.num_layers).validate(MOE)


@pytest.mark.parametrize("num_stages, num_servers", [(1, 1), (2, 2), (3, 3), (5, 2)])
def test_default_round_trips_through_toml(num_stages, num_servers):
    topology = Topology.default(MOE, num_stages, num_servers)
    assert len(topology.stages) == num_stages
    assert Topology.from_toml(topology.to_toml(), MOE.num_layers).validate(MOE) == topology
    if num_servers > 1:
        assert any(len(names) > 1 for names in topology.replicas().values())


def test_dense_default_has_no_expert_servers():
    assert Topology.default(DENSE).expert_servers == ()
