"""What the compose and Kubernetes generators share: the topology they are generated from, the
container conventions (one port, where the topology and the model are mounted), and a small
deterministic YAML writer (the same input gives the same bytes, so a test can compare a
committed file with its regeneration). Needs no torch and no YAML library."""

import dataclasses
import hashlib
import json
import pathlib
import re
import tomllib
from typing import NamedTuple

from shardmesh.mesh_settings import MeshSettings
from shardmesh.topology import ExpertServerSpec, StageSpec, Topology

PORT = 50051                                   # every service listens on it inside its container
TOPOLOGY_IN_CONTAINER = "/etc/shardmesh/topology.toml"
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
RESERVED_NAMES = {"router", "registry", "smoke", "topology", "model"}


@dataclasses.dataclass(frozen=True)
class DeploySource:
    """A topology file and where the model lives inside the containers."""
    topology: Topology
    topology_text: str           # the file's text, as mounted / put into the ConfigMap
    model_dir_in_container: str  # absolute path inside every container

    @property
    def servers(self) -> list[StageSpec | ExpertServerSpec]:
        return [*self.topology.stages, *self.topology.expert_servers]

    @property
    def settings(self) -> MeshSettings:
        """The topology file's [telemetry] and [auto_rebalance]: flags every service gets."""
        return MeshSettings.from_toml(self.topology_text)

    @property
    def topology_sha256(self) -> str:
        return hashlib.sha256(self.topology_text.encode()).hexdigest()

    def service_args(self, role: str, dtype: str, device: str = "") -> list[str]:
        """The arguments every service of `role` gets after `shardmesh` (the image's entrypoint)."""
        args = [role, "--model", self.model_dir_in_container, "--topology", TOPOLOGY_IN_CONTAINER,
                "--host", "0.0.0.0", "--port", str(PORT), "--dtype", dtype]
        return args + (["--device", device] if device else []) + self.settings.service_args(role)


class ServerContainer(NamedTuple):
    """One server's container (compose service, Kubernetes Deployment)."""
    spec: StageSpec | ExpertServerSpec
    name: str              # the container's (service's, Deployment's) name: a DNS label
    server_name: str       # its --name: the topology entry's, or a TP shard's "NAME/tpN"
    replica_id: str = ""   # a stage's standby: "standby-N"

    @property
    def is_stage(self) -> bool:
        return isinstance(self.spec, StageSpec)


def server_containers(source: DeploySource) -> list[ServerContainer]:
    """Every server's container (compose service, Kubernetes Deployment), in topology order:
    - a stage's standbys (topology `standbys`) have their own, `NAME-standby-N`, and register as
      replica `standby-N` of the stage;
    - each shard of a tensor-parallel stage (topology `tp = T`) has its own: rank 0 is `NAME`
      (`--name NAME`), rank r is `NAME-tpR` (`--name NAME/tpR`); they meet where the router tells
      them (rank 0 gives it the address of the group store it binds: router/tp_ranks.py);
    - an expert server has one (scale it).
    ValueError naming the stage for what the mesh does not serve (a TP stage with standbys), and
    for a container name that is another's or not a DNS label."""
    containers = []
    for spec in source.servers:
        if not isinstance(spec, StageSpec):
            containers.append(ServerContainer(spec, spec.name, spec.name))
        elif spec.tp > 1:
            if spec.standbys:
                raise ValueError(f"topology: stage {spec.name!r}: standbys = {spec.standbys} with tp = {spec.tp}: "
                                 f"a tensor-parallel stage cannot have standbys (the mesh does not support it yet)")
            containers += [ServerContainer(spec, f"{spec.name}-tp{rank}" if rank else spec.name, shard)
                           for rank, shard in enumerate(spec.shard_names())]
        else:
            containers += [ServerContainer(spec, f"{spec.name}-{replica_id}" if replica_id else spec.name,
                                           spec.name, replica_id) for replica_id in spec.replica_ids()]
    taken = [spec.name for spec in source.servers]
    for container in containers:
        if container.name != container.spec.name:  # a standby's or a TP shard's
            what = container.replica_id or f"shard {container.server_name!r}"
            if container.name in taken or not DNS_LABEL.match(container.name):
                raise ValueError(f"topology: {container.spec.name!r}'s {what} would be container {container.name!r}, "
                                 f"which is another server's name or not a DNS label (63 characters at most)")
            taken.append(container.name)
    return containers


def check_shard_devices(stage: str, shard_gpus: list[str], distinct: bool = True) -> None:
    """The shards of a TP stage AllReduce with NCCL on GPUs (one rank per GPU) or gloo on CPUs:
    ValueError naming the stage when some would run on a GPU and others on the CPU, or (`distinct`:
    GPU ids on one host, compose) two on one GPU. `shard_gpus`: rank -> its GPU id, "any" (one the
    cluster picks) or "" (the CPU)."""
    used = [gpu for gpu in shard_gpus if gpu]
    if used and len(used) != len(shard_gpus) or distinct and len(set(used)) != len(used):
        where = ", ".join(f"rank {rank}: {('GPU ' + gpu if gpu.isdigit() else 'a GPU') if gpu else 'CPU'}"
                          for rank, gpu in enumerate(shard_gpus))
        raise ValueError(f"topology: stage {stage!r}: its tensor-parallel shards need a GPU each or all the CPU "
                         f"({where}); give the stage one device per shard, device = [\"cuda:0\", \"cuda:1\"], "
                         f"or more GPUs")


def load(topology_file: str | pathlib.Path, model_dir_in_container: str, model_dir: str | pathlib.Path | None = None
         ) -> DeploySource:
    """Read a topology file. With `model_dir` (a checkpoint on this machine) it is validated
    against the model as a server would; without, against itself only (stages tile
    [0, last stage's end)) and the router validates the rest when it starts."""
    return from_text(pathlib.Path(topology_file).read_text(), model_dir_in_container, model_dir)


def from_text(text: str, model_dir_in_container: str, model_dir: str | pathlib.Path | None = None) -> DeploySource:
    """`load` for a topology file's text."""
    if model_dir is not None:
        from shardmesh.config import ModelConfig
        config = ModelConfig.from_dir(model_dir)
        topology = Topology.from_toml(text, config.num_layers).validate(config)
    else:
        stages = tomllib.loads(text).get("stage", [])
        num_layers = max((int(s.get("layers", [0, 0])[1]) for s in stages), default=0)
        topology = Topology.from_toml(text, num_layers)
        expected_start = 0
        for stage in topology.stages:
            if stage.start_layer != expected_start or stage.end_layer <= stage.start_layer:
                raise ValueError(f"topology: stage {stage.name!r} holds [{stage.start_layer}, {stage.end_layer}) "
                                 f"but the next range must start at {expected_start} and be non-empty")
            expected_start = stage.end_layer
    if not model_dir_in_container.startswith("/"):
        raise ValueError(f"model dir in container {model_dir_in_container!r} must be an absolute path")
    for spec in (*topology.stages, *topology.expert_servers):
        if not DNS_LABEL.match(spec.name) or spec.name in RESERVED_NAMES:
            raise ValueError(f"topology: server name {spec.name!r} cannot name a container service: use lowercase "
                             f"letters, digits and '-' (at most 63), and none of {sorted(RESERVED_NAMES)}")
    return DeploySource(topology, text, model_dir_in_container)


def header(command: str) -> str:
    return (f"# Generated by `{command}`: do not edit.\n"
            f"# Regenerate instead (scripts/gen_deploy.py for the files in deploy/); a test checks they match.\n")


FLOW_WIDTH = 100  # lists of scalars go on one line up to this width
_PLAIN = re.compile(r"^[A-Za-z/-][A-Za-z0-9_./-]*$")  # nothing YAML reads as anything but a string
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    assert isinstance(value, str), f"cannot write {type(value).__name__} as YAML"
    if _PLAIN.match(value) and value != "-" and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value)  # a JSON string is a YAML double-quoted scalar


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML for dicts (keys in insertion order), lists, str, int and bool; short
    lists of scalars in flow style ([a, b]), multi-line strings as literal blocks."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for key, item in value.items():
            head = f"{pad}{_scalar(key)}:"
            if isinstance(item, list) and _flow(item) is None or isinstance(item, dict) and item:
                out.append(f"{head}\n{to_yaml(item, indent + 2)}")
            elif isinstance(item, str) and "\n" in item.rstrip("\n") and not item.startswith((" ", "\n")):
                out.append(f"{head} {_literal(item, indent + 2)}")
            else:
                out.append(f"{head} {to_yaml(item).strip()}\n")
        return "".join(out)
    if isinstance(value, list):
        flow = _flow(value)
        if flow is not None:
            return pad + flow + "\n"
        return "".join(f"{pad}- {to_yaml(item, indent + 2)[indent + 2:]}" for item in value)
    return pad + _scalar(value) + "\n"


def _flow(items: list) -> str | None:
    """`[a, b]` for an empty or short list of scalars, else None (written as a block)."""
    if any(isinstance(item, (dict, list)) for item in items):
        return None
    flow = "[" + ", ".join(_scalar(item) for item in items) + "]"
    return flow if len(flow) <= FLOW_WIDTH else None


def _literal(text: str, indent: int) -> str:
    """A multi-line string as a literal block scalar (`|`), its trailing newlines kept exactly."""
    body = text.rstrip("\n")
    chomp = {0: "-", 1: ""}.get(len(text) - len(body), "+")
    lines = "".join(f"{' ' * indent}{line}\n" if line else "\n" for line in body.split("\n"))
    return f"|{chomp}\n{lines}" + "\n" * max(0, len(text) - len(body) - 1)
