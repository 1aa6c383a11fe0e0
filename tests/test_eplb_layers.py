"""The planner's view of layers: every MoE layer waits for its slowest expert server, so among
plans equally good by server totals it chooses the one whose layers are even, and it moves a
placement whose totals are even but whose layers are not; experts without load that a server
holds stay on it while it has slots (their weights would have to be read again later)."""

import random

from shardmesh.eplb import fits_budget, imbalance, layer_cost, plan_placement


def test_even_totals_with_uneven_layers_are_re_placed_per_layer():
    load = {(0, 0): 100.0, (0, 1): 100.0, (1, 0): 100.0, (1, 1): 100.0}
    # Totals 200 / 200 (imbalance 1), but layer 0 runs only on a and layer 1 only on b: each layer
    # waits 200 where 100 would do.
    current = {(0, 0): ("a",), (0, 1): ("a",), (1, 0): ("b",), (1, 1): ("b",)}
    assert imbalance(load, current, ["a", "b"]) == 1.0 and layer_cost(load, current) == 400.0
    plan = plan_placement(load, {"a": 2, "b": 2}, current)
    assert plan.changed and plan.imbalance == 1.0 and plan.layer_cost == 200.0
    for layer in (0, 1):
        assert {plan.replicas[(layer, 0)], plan.replicas[(layer, 1)]} == {("a",), ("b",)}
    kept = plan_placement(load, {"a": 2, "b": 2}, plan.replicas)  # and then it stays
    assert not kept.changed


def test_layer_cost_falls_on_skewed_multi_layer_loads_without_worse_totals():
    """Against packing by totals alone (the planner before layers counted), on random skewed loads
    of 4 layers x 8 experts over 3 servers: never a busier server than LAYER_SLACK allows, and a
    lower layer cost in all on these cases."""
    import shardmesh.eplb as eplb
    rng = random.Random(11)
    keys = [(l, e) for l in range(4) for e in range(8)]
    servers = ["a", "b", "c"]
    current = {key: (servers[i % 3],) for i, key in enumerate(keys)}
    with_layers = totals_only = 0.0
    for _ in range(8):
        load = {key: float(rng.paretovariate(1.1)) * 50 for key in keys}
        plan = plan_placement(load, {n: 14 for n in servers}, current)
        original = eplb._pack
        eplb._pack = lambda weights, counts, servers, slots, now, by_layer=False: (
            None if by_layer else original(weights, counts, servers, slots, now))
        try:
            baseline = plan_placement(load, {n: 14 for n in servers}, current)
        finally:
            eplb._pack = original
        assert max(plan.server_load.values()) <= max(baseline.server_load.values()) * (1 + eplb.LAYER_SLACK) + 1e-9
        assert fits_budget(plan.replicas, {n: 14 for n in servers})
        with_layers += plan.layer_cost
        totals_only += baseline.layer_cost
    assert with_layers < 0.97 * totals_only, (with_layers, totals_only)


def test_experts_without_load_stay_where_they_are_loaded_while_slots_allow():
    load = {(0, 0): 100.0, (0, 1): 100.0, (0, 2): 0.0}
    current = {(0, 0): ("a",), (0, 1): ("a",), (0, 2): ("a", "b")}
    plan = plan_placement(load, {"a": 3, "b": 3}, current)
    assert plan.changed and plan.imbalance == 1.0
    assert plan.replicas[(0, 2)] == ("a", "b")  # one replica would do, but both are loaded already
    tight = plan_placement(load, {"a": 2, "b": 1}, current)  # no slot to spare: one replica of it is left
    assert len(tight.replicas[(0, 2)]) == 1 and fits_budget(tight.replicas, {"a": 2, "b": 1})
