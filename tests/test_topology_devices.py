"""Per-server devices in the topology file (`device = "cuda:N"` on a [[stage]] or [[expert_server]],
one per shard for a TP stage): parsed, written back, refused when malformed; what a service runs on
(its own --device first, then the topology's, then cpu); and the generated compose file, which
reserves each server's GPU and runs it as cuda:0 inside its container."""

import pytest
import yaml

from shardmesh import deploy_common
from shardmesh.deploy_compose import compose_yaml
from shardmesh.service_config import ServiceConfig
from shardmesh.topology import Topology

TOPOLOGY = """
[[stage]]
name = "stage-0"
layers = [0, 2]
device = "cuda:2"

[[stage]]
name = "stage-1"
layers = [2, 4]
tp = 2
device = ["cuda:0", "cuda:1"]

[[expert_server]]
name = "experts-a"
experts = [0, 1, 2, 3]
layers = [0, 2]
device = "cuda:3"

[[expert_server]]
name = "experts-a"
experts = [0, 1, 2, 3]
layers = [2, 4]

[[expert_server]]
name = "experts-b"
experts = [4, 5, 6, 7]
device = "cpu"
"""


def test_devices_are_read_per_server_and_shard_and_written_back():
    topology = Topology.from_toml(TOPOLOGY, 4)
    assert {name: topology.device_of(name) for name in ("stage-0", "stage-1", "stage-1/tp1", "experts-a",
                                                         "experts-b", "router")} == {
        "stage-0": "cuda:2", "stage-1": "cuda:0", "stage-1/tp1": "cuda:1", "experts-a": "cuda:3",
        "experts-b": "cpu", "router": ""}
    assert Topology.from_toml(topology.to_toml(), 4) == topology
    assert 'device = ["cuda:0", "cuda:1"]' in topology.to_toml()
    assert Topology.from_toml(TOPOLOGY.replace('device = "cuda:2"\n', ""), 4).device_of("stage-0") == ""


@pytest.mark.parametrize("change,message", [
    (('device = "cuda:2"', 'device = "gpu0"'), "'stage-0': device 'gpu0' is not \"cpu\" or \"cuda:N\""),
    (('device = "cuda:2"', "device = 3"), "'stage-0': device 3 is not"),
    (('["cuda:0", "cuda:1"]', '["cuda:0"]'), "stage 'stage-1': device lists 1 devices for tp 2"),
    (('layers = [2, 4]\n\n[[expert_server]]\nname = "experts-b"', 'layers = [2, 4]\ndevice = "cuda:4"\n\n'
      '[[expert_server]]\nname = "experts-b"'), "expert server 'experts-a': tables give devices 'cuda:3' and 'cuda:4'"),
])
def test_malformed_devices_are_refused_naming_the_server(change, message):
    assert change[0] in TOPOLOGY
    with pytest.raises(ValueError) as refused:
        Topology.from_toml(TOPOLOGY.replace(*change), 4)
    assert message in str(refused.value)


def test_a_service_runs_on_its_own_device_else_the_topology_s_else_the_cpu(mixtral_dir, tmp_path):
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(TOPOLOGY)
    config = ServiceConfig(model_dir=mixtral_dir, name="experts-b", topology_file=topology_file, device="")
    assert (config.device, config.dtype) == ("cpu", "float32")
    explicit = ServiceConfig(model_dir=mixtral_dir, name="stage-0", topology_file=topology_file, device="cpu")
    assert explicit.device == "cpu"  # the command line's --device wins over the topology's cuda:2
    bare = tmp_path / "bare.toml"
    bare.write_text(TOPOLOGY.replace('device = "cpu"\n', ""))
    assert ServiceConfig(model_dir=mixtral_dir, name="experts-b", topology_file=bare, device="").device == "cpu"
    with pytest.raises(ValueError, match="'cuda:2' asked for"):  # no GPU here: proves it read the topology
        ServiceConfig(model_dir=mixtral_dir, name="stage-0", topology_file=topology_file, device="")


def test_compose_reserves_each_server_s_gpu_and_runs_it_as_cuda_0():
    source = deploy_common.from_text(TOPOLOGY.replace("tp = 2\n", "").replace('["cuda:0", "cuda:1"]', '"cuda:0"'),
                                     "/models/demo")
    services = yaml.safe_load(compose_yaml(source, "./topology.toml", "test", expert_gpus=["7"]))["services"]
    reserved = {name: s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
                for name, s in services.items()}
    assert reserved["stage-0"] == [{"driver": "nvidia", "device_ids": ["2"], "capabilities": ["gpu"]}]
    assert reserved["stage-1"][0]["device_ids"] == ["0"]
    assert reserved["experts-a"][0]["device_ids"] == ["3"]  # the topology's, not the pool's "7"
    assert reserved["experts-b"] is None and reserved["router"] is None
    for name in ("stage-0", "stage-1", "experts-a"):
        command = services[name]["command"]
        assert command[command.index("--device") + 1] == "cuda:0", name
        assert command[command.index("--dtype") + 1] == "bfloat16"
    assert "--device" not in services["experts-b"]["command"]  # the mounted topology says cpu
    assert services["router"]["image"].endswith(":-shardmesh:cuda}")
