"""The topology file's text: reading the `device` keys (`read_devices`) and writing a topology back
as TOML (`write_toml`, what `Topology.to_toml` returns). The tables themselves: topology.py."""

import re


def write_toml(topology) -> str:
    """topology: a shardmesh.topology.Topology -> its file, every [[stage]], [[expert_server]] and
    [[split_expert]] table (runs of layers with the same experts grouped in one table)."""
    lines = []
    devices = dict(topology.devices)
    for stage in topology.stages:
        shard_devices = [devices.get(name, "") for name in stage.shard_names()]
        lines += ["[[stage]]", f'name = "{stage.name}"', f"layers = [{stage.start_layer}, {stage.end_layer}]",
                  *([device_line(shard_devices)] if any(shard_devices) else []),
                  *([f"tp = {stage.tp}"] if stage.tp > 1 else []),
                  *([f"standbys = {stage.standbys}"] if stage.standbys else []), ""]
    for spec in topology.expert_servers:
        by_layer: dict[int, set[int]] = {}
        for layer, expert in spec.experts:
            by_layer.setdefault(layer, set()).add(expert)
        if not by_layer:  # holds only slices of split experts (below)
            lines += ["[[expert_server]]", f'name = "{spec.name}"', "experts = []",
                      *([device_line([devices[spec.name]])] if spec.name in devices else []), ""]
            continue
        # Group runs of layers that hold the same expert set into one table each.
        layers = sorted(by_layer)
        run_start = layers[0]
        for i, layer in enumerate(layers):
            last = i + 1 == len(layers) or layers[i + 1] != layer + 1 or by_layer[layers[i + 1]] != by_layer[layer]
            if last:
                ids = ", ".join(str(e) for e in sorted(by_layer[layer]))
                lines += ["[[expert_server]]", f'name = "{spec.name}"', f"experts = [{ids}]",
                          f"layers = [{run_start}, {layer + 1}]",
                          *([device_line([devices[spec.name]])] if spec.name in devices else []), ""]
                if i + 1 < len(layers):
                    run_start = layers[i + 1]
    for (layer, expert), servers in sorted(topology.splits().items()):  # one table per split expert
        names = ", ".join(f'"{name}"' for name in servers)
        lines += ["[[split_expert]]", f"experts = [{expert}]", f"layers = [{layer}, {layer + 1}]",
                  f"tp = {len(servers)}", f"servers = [{names}]", ""]
    return "\n".join(lines)


DEVICE = re.compile(r"cpu|cuda:\d{1,3}")


def read_devices(raw: dict, stages: tuple) -> tuple[tuple[str, str], ...]:
    """The `device` keys of [[stage]] and [[expert_server]] tables, per server (TP shard) name."""
    found: dict[str, str] = {}
    for stage, entry in zip(stages, raw.get("stage", [])):
        device = entry.get("device")
        if device is None:
            continue
        names = stage.shard_names()
        per_shard = list(device) if isinstance(device, list) else [device] * len(names)
        if len(per_shard) != len(names):
            raise ValueError(f"topology: stage {stage.name!r}: device lists {len(per_shard)} devices for tp {stage.tp}")
        found.update(zip(names, (check_device(d, stage.name) for d in per_shard)))
    for entry in raw.get("expert_server", []):
        if "device" in entry:
            device = check_device(entry["device"], entry["name"])
            if found.setdefault(entry["name"], device) != device:
                raise ValueError(f"topology: expert server {entry['name']!r}: tables give devices "
                                 f"{found[entry['name']]!r} and {device!r}")
    return tuple(sorted(found.items()))


def check_device(device, server: str) -> str:
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise ValueError(f"topology: {server!r}: device {device!r} is not \"cpu\" or \"cuda:N\"")
    return device


def device_line(devices: list[str]) -> str:
    if len(set(devices)) == 1:
        return f'device = "{devices[0]}"'
    return "device = [" + ", ".join(f'"{d}"' for d in devices) + "]"
