"""Which server holds what: the topology file (TOML), validated once against the model.

    [[stage]]
    name = "stage-0"
    layers = [0, 2]          # half-open [start, end)

    [[stage]]
    name = "stage-1"
    layers = [2, 4]

    tp = 2                   # optional: served by 2 tensor-parallel shard servers,
                             # "stage-1" (rank 0, the one the router talks to) and "stage-1/tp1"

    [[expert_server]]
    name = "experts-a"
    experts = [0, 1, 2, 3, 4]  # these expert ids in every MoE layer ...
    layers = [0, 4]            # ... of this layer range (optional: default every layer)

Stages must tile [0, num_layers) in order; for an MoE model every (layer, expert) must be held
by at least one expert server (more than one = replicas).
"""

import dataclasses
import pathlib
import tomllib

from shardmesh.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    start_layer: int
    end_layer: int
    tp: int = 1  # tensor-parallel shard servers: rank 0 is `name`, rank r > 0 is `name/tp{r}`

    def shard_names(self) -> list[str]:
        return [self.name] + [f"{self.name}/tp{rank}" for rank in range(1, self.tp)]


@dataclasses.dataclass(frozen=True)
class ExpertServerSpec:
    name: str
    experts: tuple[tuple[int, int], ...]  # (layer, expert), sorted


@dataclasses.dataclass(frozen=True)
class Topology:
    stages: tuple[StageSpec, ...]
    expert_servers: tuple[ExpertServerSpec, ...] = ()

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

    def validate(self, config: ModelConfig) -> "Topology":
        """Raise ValueError unless this topology serves `config` completely."""
        from shardmesh.models.parallel import check_tp_shapes

        expected_start = 0
        for stage in self.stages:
            if stage.tp < 1 or "/" in stage.name:
                raise ValueError(f"topology: stage {stage.name!r}: tp {stage.tp} must be >= 1 and names have no '/'")
            if stage.tp > 1:
                check_tp_shapes(config, stage.tp)
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
        for spec in self.expert_servers:
            for layer, expert in spec.experts:
                if not (0 <= layer < config.num_layers and 0 <= expert < config.num_experts):
                    raise ValueError(f"topology: {spec.name!r} holds (layer {layer}, expert {expert}) "
                                     f"outside {config.num_layers} layers x {config.num_experts} experts")
        missing = [(l, e) for l in range(config.num_layers) for e in range(config.num_experts) if (l, e) not in holders]
        if missing:
            raise ValueError(f"topology: no expert server holds {missing[:8]}{'...' if len(missing) > 8 else ''}")
        return self

    @classmethod
    def from_toml(cls, text: str, num_layers: int) -> "Topology":
        raw = tomllib.loads(text)
        unknown = set(raw) - {"stage", "expert_server"}
        if unknown:
            raise ValueError(f"topology: unknown tables {sorted(unknown)} (expected [[stage]], [[expert_server]])")
        stages = tuple(StageSpec(s["name"], *_layer_range(s, num_layers), int(s.get("tp", 1))) for s in raw.get("stage", []))
        # Several tables may share one name: their experts are merged into one server.
        experts: dict[str, set[tuple[int, int]]] = {}
        for entry in raw.get("expert_server", []):
            start, end = _layer_range(entry, num_layers)
            keys = experts.setdefault(entry["name"], set())
            keys.update((layer, int(e)) for layer in range(start, end) for e in entry["experts"])
        return cls(stages, tuple(ExpertServerSpec(name, tuple(sorted(keys))) for name, keys in experts.items()))

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
        lines = []
        for stage in self.stages:
            lines += ["[[stage]]", f'name = "{stage.name}"', f"layers = [{stage.start_layer}, {stage.end_layer}]",
                      *([f"tp = {stage.tp}"] if stage.tp > 1 else []), ""]
        for spec in self.expert_servers:
            by_layer: dict[int, set[int]] = {}
            for layer, expert in spec.experts:
                by_layer.setdefault(layer, set()).add(expert)
            # Group runs of layers that hold the same expert set into one table each.
            layers = sorted(by_layer)
            run_start = layers[0]
            for i, layer in enumerate(layers):
                last = i + 1 == len(layers) or layers[i + 1] != layer + 1 or by_layer[layers[i + 1]] != by_layer[layer]
                if last:
                    ids = ", ".join(str(e) for e in sorted(by_layer[layer]))
                    lines += ["[[expert_server]]", f'name = "{spec.name}"', f"experts = [{ids}]",
                              f"layers = [{run_start}, {layer + 1}]", ""]
                    if i + 1 < len(layers):
                        run_start = layers[i + 1]
        return "\n".join(lines)


def _layer_range(entry: dict, num_layers: int) -> tuple[int, int]:
    start, end = entry.get("layers", [0, num_layers])
    return int(start), int(end)
