"""Which server holds what: the topology file (TOML), validated once against the model.

    [[stage]]
    name = "stage-0"
    layers = [0, 2]          # half-open [start, end)

    [[stage]]
    name = "stage-1"
    layers = [2, 4]

    tp = 2                   # optional: served by 2 tensor-parallel shard servers,
                             # "stage-1" (rank 0, the one the router talks to) and "stage-1/tp1"
    standbys = 1             # optional: 1 more server of these layers (replica id "standby-1") that
                             # takes over when the active one dies (router/failover.py)
    device = "cuda:1"        # optional, any server: where it runs ("cpu" or "cuda:N"); a TP stage may
                             # give one per shard, device = ["cuda:0", "cuda:1"]. A service's own
                             # --device wins; without either, cpu. Compose files reserve that GPU.

    [[expert_server]]
    name = "experts-a"
    experts = [0, 1, 2, 3, 4]  # these expert ids in every MoE layer ...
    layers = [0, 4]            # ... of this layer range (optional: default every layer)

    [[split_expert]]           # an expert too big for one server, split tensor-parallel:
    experts = [5]              # these expert ids ...
    layers = [0, 4]            # ... of these layers (optional: default every layer)
    tp = 2                     # optional, = len(servers): slice r (w1/w3 rows, w2 columns) ...
    servers = ["big-0", "big-1"]  # ... on servers[r] (expert servers, declared here if not above)

Stages must tile [0, num_layers) in order; for an MoE model every (layer, expert) must be held
by at least one expert server (more than one = replicas), or be split (then by no server whole).
"""

import dataclasses
import pathlib
import tomllib

from shardmesh.config import ModelConfig
from shardmesh.topology_toml import read_devices, write_toml


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    start_layer: int
    end_layer: int
    tp: int = 1  # tensor-parallel shard servers: rank 0 is `name`, rank r > 0 is `name/tp{r}`
    standbys: int = 0  # more servers of the same layers, idle until the active one dies

    def shard_names(self) -> list[str]:
        return [self.name] + [f"{self.name}/tp{rank}" for rank in range(1, self.tp)]

    def replica_ids(self) -> list[str]:
        """Replica ids `shardmesh up` starts: "" (the first active one), then "standby-1", ..."""
        return [""] + [f"standby-{i}" for i in range(1, self.standbys + 1)]


@dataclasses.dataclass(frozen=True)
class ExpertSlice:
    """Slice `rank` of `tp` of one split expert: w1/w3 rows and w2 columns [rank * I/tp, (rank + 1) * I/tp)."""
    layer: int
    expert: int
    rank: int
    tp: int


@dataclasses.dataclass(frozen=True)
class ExpertServerSpec:
    name: str
    experts: tuple[tuple[int, int], ...]  # (layer, expert), sorted
    slices: tuple[ExpertSlice, ...] = ()  # slices of split experts it holds, sorted


@dataclasses.dataclass(frozen=True)
class Topology:
    stages: tuple[StageSpec, ...]
    expert_servers: tuple[ExpertServerSpec, ...] = ()
    devices: tuple[tuple[str, str], ...] = ()  # (server or TP shard name, "cpu" | "cuda:N") from `device` keys

    def device_of(self, name: str) -> str:
        """The topology's device for server (or TP shard) `name`; "" when it names none."""
        return dict(self.devices).get(name, "")

    def __post_init__(self):
        names = [s.name for s in self.stages] + [e.name for e in self.expert_servers]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"topology: server names must be unique, repeated: {sorted(duplicates)}")
        if not self.stages:
            raise ValueError("topology: at least one [[stage]] is needed")

    def server(self, name: str) -> StageSpec | ExpertServerSpec:
        """The spec of server `name`; a TP shard server ("stage-1/tp1") gets its stage's spec."""
        for spec in (*self.stages, *self.expert_servers):
            if spec.name == name:
                return spec
        for spec in self.stages:
            if name in spec.shard_names():
                return spec
        raise KeyError(f"topology has no server named {name!r} (has {[s.name for s in self.stages]} "
                       f"and {[e.name for e in self.expert_servers]})")

    def replicas(self) -> dict[tuple[int, int], list[str]]:
        """(layer, expert) -> names of the expert servers holding it, in topology order."""
        holders: dict[tuple[int, int], list[str]] = {}
        for spec in self.expert_servers:
            for key in spec.experts:
                holders.setdefault(key, []).append(spec.name)
        return holders

    def splits(self) -> dict[tuple[int, int], list[str]]:
        """(layer, expert) of each split expert -> names of the servers holding slice 0, 1, ..."""
        slices: dict[tuple[int, int], dict[int, str]] = {}
        for spec in self.expert_servers:
            for piece in spec.slices:
                slices.setdefault((piece.layer, piece.expert), {})[piece.rank] = spec.name
        return {key: [by_rank[r] for r in sorted(by_rank)] for key, by_rank in slices.items()}

    def validate(self, config: ModelConfig) -> "Topology":
        """Raise ValueError unless this topology serves `config` completely."""
        from shardmesh.models.parallel import check_tp_shapes

        expected_start = 0
        for stage in self.stages:
            if stage.tp < 1 or "/" in stage.name:
                raise ValueError(f"topology: stage {stage.name!r}: tp {stage.tp} must be >= 1 and names have no '/'")
            if stage.tp > 1:
                check_tp_shapes(config, stage.tp)
            if stage.standbys < 0 or (stage.standbys and stage.tp > 1):
                raise ValueError(f"topology: stage {stage.name!r}: standbys {stage.standbys} must be >= 0, "
                                 f"and 0 for a tensor-parallel stage (not supported yet)")
            if stage.start_layer != expected_start or stage.end_layer <= stage.start_layer:
                raise ValueError(f"topology: stage {stage.name!r} holds [{stage.start_layer}, {stage.end_layer}) "
                                 f"but the next range must start at {expected_start} and be non-empty")
            expected_start = stage.end_layer
        if expected_start != config.num_layers:
            raise ValueError(f"topology: stages cover [0, {expected_start}) but the model has {config.num_layers} layers")
        if not config.is_moe:
            if self.expert_servers:
                raise ValueError("topology: expert servers given for a dense model")
            return self
        holders = self.replicas()
        splits = self._validate_splits(config, holders)
        for spec in self.expert_servers:
            for layer, expert in spec.experts:
                if not (0 <= layer < config.num_layers and 0 <= expert < config.num_experts):
                    raise ValueError(f"topology: {spec.name!r} holds (layer {layer}, expert {expert}) "
                                     f"outside {config.num_layers} layers x {config.num_experts} experts")
        missing = [(l, e) for l in range(config.num_layers) for e in range(config.num_experts)
                   if (l, e) not in holders and (l, e) not in splits]
        if missing:
            raise ValueError(f"topology: no expert server holds {missing[:8]}{'...' if len(missing) > 8 else ''}")
        return self

    def _validate_splits(self, config: ModelConfig, holders) -> dict[tuple[int, int], list[str]]:
        splits = self.splits()
        for (layer, expert), servers in splits.items():
            where = f"topology: split expert (layer {layer}, expert {expert})"
            tps = {p.tp for s in self.expert_servers for p in s.slices if (p.layer, p.expert) == (layer, expert)}
            if len(tps) != 1 or tps != {len(servers)} or len(set(servers)) != len(servers):
                raise ValueError(f"{where}: needs slices 0..tp-1 on distinct servers, has {servers} (tp {sorted(tps)})")
            if not (0 <= layer < config.num_layers and 0 <= expert < config.num_experts):
                raise ValueError(f"{where} is outside {config.num_layers} layers x {config.num_experts} experts")
            if (layer, expert) in holders:
                raise ValueError(f"{where} is also held whole by {holders[(layer, expert)]}")
            if len(servers) < 2 or config.intermediate_size % len(servers):
                raise ValueError(f"{where}: intermediate_size {config.intermediate_size} does not split "
                                 f"into tp {len(servers)} >= 2 slices")
        return splits

    @classmethod
    def from_toml(cls, text: str, num_layers: int) -> "Topology":
        from shardmesh.mesh_settings import TABLES as SETTINGS_TABLES, MeshSettings  # [telemetry], [auto_rebalance]
        raw = tomllib.loads(text)
        unknown = set(raw) - {"stage", "expert_server", "split_expert", *SETTINGS_TABLES}
        if unknown:
            raise ValueError(f"topology: unknown tables {sorted(unknown)} (expected [[stage]], [[expert_server]], "
                             f"[[split_expert]], and the mesh settings {[f'[{t}]' for t in SETTINGS_TABLES]})")
        MeshSettings.from_toml(text)  # raises naming a bad setting (they are read where services are started)
        stages = tuple(StageSpec(s["name"], *_layer_range(s, num_layers), int(s.get("tp", 1)), int(s.get("standbys", 0)))
                       for s in raw.get("stage", []))
        # Several tables may share one name: their experts are merged into one server.
        experts: dict[str, set[tuple[int, int]]] = {}
        for entry in raw.get("expert_server", []):
            start, end = _layer_range(entry, num_layers)
            keys = experts.setdefault(entry["name"], set())
            keys.update((layer, int(e)) for layer in range(start, end) for e in entry["experts"])
        slices: dict[str, set[ExpertSlice]] = {}
        for entry in raw.get("split_expert", []):
            start, end = _layer_range(entry, num_layers)
            servers = list(entry["servers"])
            tp = int(entry.get("tp", len(servers)))
            if tp != len(servers):
                raise ValueError(f"topology: [[split_expert]] tp = {tp} but {len(servers)} servers {servers}")
            for rank, name in enumerate(servers):
                experts.setdefault(name, set())
                slices.setdefault(name, set()).update(ExpertSlice(layer, int(e), rank, tp)
                                                      for layer in range(start, end) for e in entry["experts"])
        return cls(stages, tuple(ExpertServerSpec(name, tuple(sorted(keys)), _sorted_slices(slices.get(name, ())))
                                 for name, keys in experts.items()), read_devices(raw, stages))

    @classmethod
    def from_file(cls, path: str | pathlib.Path, config: ModelConfig) -> "Topology":
        return cls.from_toml(pathlib.Path(path).read_text(), config.num_layers).validate(config)

    @classmethod
    def default(cls, config: ModelConfig, num_stages: int = 2, num_expert_servers: int = 2) -> "Topology":
        """Layers split evenly over `num_stages`; experts split over expert servers, each also
        holding the next server's first expert, so some experts have two replicas."""
        num_stages = min(num_stages, config.num_layers)
        bounds = [round(i * config.num_layers / num_stages) for i in range(num_stages + 1)]
        stages = tuple(StageSpec(f"stage-{i}", bounds[i], bounds[i + 1]) for i in range(num_stages))
        if not config.is_moe:
            return cls(stages)
        n = min(num_expert_servers, config.num_experts)
        cuts = [round(i * config.num_experts / n) for i in range(n + 1)]
        servers = []
        for i in range(n):
            ids = set(range(cuts[i], cuts[i + 1]))
            if n > 1:
                ids.add(cuts[i + 1] % config.num_experts)  # one replica shared with the next server
            keys = tuple(sorted((layer, e) for layer in range(config.num_layers) for e in ids))
            servers.append(ExpertServerSpec(f"experts-{chr(ord('a') + i)}", keys))
        return cls(stages, tuple(servers)).validate(config)

    def to_toml(self) -> str:
        """The topology file that reads back as this topology (shardmesh/topology_toml.py)."""
        return write_toml(self)


def _sorted_slices(slices) -> tuple[ExpertSlice, ...]:
    return tuple(sorted(slices, key=dataclasses.astuple))


def _layer_range(entry: dict, num_layers: int) -> tuple[int, int]:
    start, end = entry.get("layers", [0, num_layers])
    return int(start), int(end)
