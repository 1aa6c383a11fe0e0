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


def server_containers(source: DeploySource) -> list[tuple[StageSpec | ExpertServerSpec, str, str]]:
    """(topology entry, replica id, container name) of every server's container (compose service,
    Kubernetes Deployment): a stage's standbys (topology `standbys`) have their own, `NAME-standby-N`,
    and register as replica `standby-N` of the stage; an expert server has one (scale it)."""
    names = [(spec, replica_id, f"{spec.name}-{replica_id}" if replica_id else spec.name)
             for spec in source.servers
             for replica_id in (spec.replica_ids() if isinstance(spec, StageSpec) else [""])]
    taken = {spec.name for spec in source.servers}
    for spec, replica_id, name in names:
        if replica_id and (name in taken or not DNS_LABEL.match(name)):
            raise ValueError(f"topology: {spec.name!r}'s {replica_id} would be container {name!r}, which is "
                             f"another server's name or not a DNS label (63 characters at most)")
    return names


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
