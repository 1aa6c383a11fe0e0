"""Expert placement planner in the manner of DeepSeek's EPLB (pure Python: no torch, no grpc).

    plan = plan_placement(load, slots, current)
    plan.replicas      # (layer, expert) -> names of the servers that should hold it
    plan.imbalance     # busiest server's load / mean server load, after the plan

`load` is what the router observed: tokens per (layer, expert) over a window. A replica's load is
its expert's load divided by the expert's replica count (dispatch spreads an expert's tokens over
its replicas by least outstanding work). A server's load is the sum over the replicas it holds;
`slots` is how many (layer, expert) replicas each server may hold (0 = drain it).

The plan, like EPLB's `replicate_experts` + `balanced_packing`:
1. replication: each spare slot in turn goes to the expert whose per-replica load is highest;
   every count of extra replicas from none to all spare slots is tried, keeping the best;
2. packing: replicas heaviest first, each onto the least-loaded server with a free slot that does
   not hold that expert yet (ties: a server that holds it now, so fewer weights move);
3. refinement: moves and swaps off the busiest server while they lower it (eplb_refine.py).

Layers: a stage's MoE layer waits for its slowest expert server, so a plan whose totals are even
but which puts one layer's hot experts together is slow. Packing is tried both by server totals
and by each server's load in the replica's own layer (EPLB packs per layer); among the plans
whose busiest server is within LAYER_SLACK of the best, the one with the lowest `layer_cost` (sum
over layers of that layer's busiest server) wins. Experts that had no load in the window and that
a server holds now stay on it while it has free slots (`_keep_cold`): they cost nothing to keep
and would have to be read again when the load moves back.

A plan is returned only if it lowers the busiest server's load below the current placement's (by
more than `min_gain`, relative), or keeps it and lowers `layer_cost` so; otherwise the current
placement comes back unchanged. A current
placement that breaks the budget (a drained server still holds experts) is always replaced.
"""

import dataclasses
from collections.abc import Mapping, Sequence

from shardmesh.eplb_refine import refine

ExpertKey = tuple[int, int]  # (layer, expert)
REFINED_CANDIDATES = 4  # the best packings (by peak) that the local search then improves
LAYER_SLACK = 0.01      # a busiest server this much above the best still competes on layer_cost


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    replicas: dict[ExpertKey, tuple[str, ...]]  # (layer, expert) -> server names, sorted
    server_load: dict[str, float]               # tokens per window each server would compute
    imbalance: float                             # max(server_load) / mean over servers with slots
    changed: bool                                # False: the current placement is kept
    current_imbalance: float                     # the same measure for the current placement (inf if it breaks the budget)
    layer_cost: float = 0.0                      # sum over layers of the busiest server's load in that layer


def layer_cost(load: Mapping[ExpertKey, float], replicas: Mapping[ExpertKey, Sequence[str]]) -> float:
    """Sum over layers of the busiest server's load in that layer: the time a step waits on
    experts when every layer waits for its slowest server (len(servers) x layers = perfect)."""
    per_layer: dict[tuple[int, str], float] = {}
    for key, holders in replicas.items():
        for name in holders:
            per_layer[key[0], name] = per_layer.get((key[0], name), 0.0) + float(load.get(key, 0.0)) / len(holders)
    busiest: dict[int, float] = {}
    for (layer, _), value in per_layer.items():
        busiest[layer] = max(busiest.get(layer, 0.0), value)
    return sum(busiest.values())


def server_loads(load: Mapping[ExpertKey, float], replicas: Mapping[ExpertKey, Sequence[str]],
                 servers: Sequence[str]) -> dict[str, float]:
    """Each server's share of the load: sum over its replicas of load / replica count."""
    totals = {name: 0.0 for name in servers}
    for key, holders in replicas.items():
        for name in holders:
            totals[name] = totals.get(name, 0.0) + float(load.get(key, 0.0)) / len(holders)
    return totals


def imbalance(load: Mapping[ExpertKey, float], replicas: Mapping[ExpertKey, Sequence[str]],
              servers: Sequence[str]) -> float:
    """max server load / mean server load over `servers` (1.0 = perfect; 1.0 as well with no load)."""
    totals = server_loads(load, replicas, servers)
    mean = sum(totals.values()) / len(servers)
    return max(totals.values()) / mean if mean > 0 else 1.0


def fits_budget(replicas: Mapping[ExpertKey, Sequence[str]], slots: Mapping[str, int]) -> bool:
    """Every replica on a server with a budget, no server over it, no expert twice on one server."""
    used = {name: 0 for name in slots}
    for holders in replicas.values():
        if not holders or len(set(holders)) != len(holders):
            return False
        for name in holders:
            if name not in used:
                return False
            used[name] += 1
    return all(used[name] <= slots[name] for name in slots)


def plan_placement(load: Mapping[ExpertKey, float], slots: Mapping[str, int],
                   current: Mapping[ExpertKey, Sequence[str]], min_gain: float = 0.0) -> PlacementPlan:
    """Choose replicas and their servers for every expert of `current` (and of `load`).

    load: (layer, expert) -> tokens per window (missing = 0); slots: server name -> how many
    replicas it may hold; current: (layer, expert) -> servers holding it now. Raises ValueError
    when the budget cannot hold one replica of every expert."""
    keys = sorted(set(current) | set(load))
    for key in keys:
        if load.get(key, 0.0) < 0:
            raise ValueError(f"load of {key} is negative: {load[key]}")
    servers = [name for name in slots if slots[name] > 0]
    if sum(slots[name] for name in servers) < len(keys):
        raise ValueError(f"{len(keys)} experts need a slot each but the servers have "
                         f"{sum(slots[name] for name in servers)} in all")
    weights = {key: float(load.get(key, 0.0)) for key in keys}
    current = {key: tuple(current.get(key, ())) for key in keys}

    def peak(replicas) -> float:
        return max(server_loads(weights, replicas, servers).values())

    packed = {False: [], True: []}  # by_layer -> [(peak, extra replicas, replicas)]: fewer extra replicas win ties
    for extra, counts in enumerate(_replica_counts(weights, keys, len(servers), sum(slots[n] for n in servers) - len(keys))):
        for by_layer in packed:
            replicas = _pack(weights, counts, servers, slots, current, by_layer)
            if replicas is not None:
                packed[by_layer].append((peak(replicas), extra, replicas))
    assert packed[False], "one replica of each expert always packs when the slots suffice"
    refined = []  # (peak, layer cost, extra replicas, replicas)
    for candidates in packed.values():
        for _, extra, replicas in sorted(candidates, key=lambda p: (p[0], p[1]))[:REFINED_CANDIDATES]:
            refine(weights, replicas, servers, slots)
            refined.append((peak(replicas), layer_cost(weights, replicas), extra, replicas))
    lowest = min(r[0] for r in refined)
    best = min((r for r in refined if r[0] <= lowest * (1 + LAYER_SLACK) + 1e-12), key=lambda r: (r[1], r[0], r[2]))
    best = (best[0], best[2], best[3])
    planned = {key: tuple(sorted(holders)) for key, holders in best[2].items()}

    current_ok = fits_budget(current, {n: slots[n] for n in servers})
    current_imbalance = imbalance(weights, current, servers) if current_ok else float("inf")
    current_peak = peak(current) if current_ok else 0.0
    lower_peak = best[0] < current_peak * (1 - min_gain)
    # As busy at the top, but layers wait less: worth moving weights too.
    lower_layer_cost = (best[0] <= current_peak * (1 + 1e-12)
                        and layer_cost(weights, planned) < layer_cost(weights, current) * (1 - min_gain) - 1e-9)
    if current_ok and not (lower_peak or lower_layer_cost):
        chosen, changed = {key: tuple(sorted(h)) for key, h in current.items()}, False
    else:
        planned = _keep_cold(weights, planned, current, servers, slots)
        chosen, changed = planned, planned != {key: tuple(sorted(h)) for key, h in current.items()}
    return PlacementPlan(chosen, server_loads(weights, chosen, servers), imbalance(weights, chosen, servers),
                         changed, current_imbalance, layer_cost(weights, chosen))


def _keep_cold(weights, planned, current, servers, slots) -> dict[ExpertKey, tuple[str, ...]]:
    """`planned` plus, on each server with free slots, the experts without load that it holds now
    and the plan moved elsewhere (an extra replica of an expert with no tokens changes no load)."""
    used = {name: 0 for name in servers}
    for holders in planned.values():
        for name in holders:
            used[name] += 1
    kept = dict(planned)
    for key in sorted(current):
        if weights[key] > 0:
            continue
        for name in current[key]:
            if name in used and name not in kept[key] and used[name] < slots[name]:
                kept[key] = tuple(sorted((*kept[key], name)))
                used[name] += 1
    return kept


def _replica_counts(weights: dict[ExpertKey, float], keys: list[ExpertKey], num_servers: int, spare: int):
    """Yield replica counts with 0, 1, ... `spare` extra replicas, each extra one going to the
    expert with the highest load per replica (at most one replica per server)."""
    counts = {key: 1 for key in keys}
    position = {key: i for i, key in enumerate(keys)}
    yield dict(counts)
    for _ in range(spare):
        candidates = [key for key in keys if counts[key] < num_servers and weights[key] > 0]
        if not candidates:
            return
        hottest = max(candidates, key=lambda key: (weights[key] / counts[key], -position[key]))
        counts[hottest] += 1
        yield dict(counts)


def _pack(weights, counts, servers, slots, current, by_layer: bool = False) -> dict[ExpertKey, list[str]] | None:
    """Replicas heaviest first onto the least-loaded eligible server (`by_layer`: least loaded in
    the replica's layer first, then in all); None if some replica finds no server with a free slot
    that lacks its expert."""
    items = sorted(((weights[key] / counts[key], key) for key in counts for _ in range(counts[key])),
                   key=lambda item: (-item[0], item[1]))
    totals = {name: 0.0 for name in servers}
    in_layer: dict[tuple[int, str], float] = {}  # (layer, server) -> load so far
    free = {name: slots[name] for name in servers}
    replicas: dict[ExpertKey, list[str]] = {key: [] for key in counts}
    order = {name: i for i, name in enumerate(servers)}
    for share, key in items:
        eligible = [name for name in servers if free[name] > 0 and name not in replicas[key]]
        if not eligible:
            return None
        if share == 0:  # costs nothing anywhere: stay put if possible (nothing to load)
            target = min(eligible, key=lambda n: (n not in current[key], totals[n], -free[n], order[n]))
        elif by_layer:
            target = min(eligible, key=lambda n: (in_layer.get((key[0], n), 0.0), totals[n], n not in current[key],
                                                  -free[n], order[n]))
        else:  # least loaded; then one that holds the expert now; then most free slots
            target = min(eligible, key=lambda n: (totals[n], n not in current[key], -free[n], order[n]))
        replicas[key].append(target)
        in_layer[key[0], target] = in_layer.get((key[0], target), 0.0) + share
        totals[target] += share
        free[target] -= 1
    return replicas
