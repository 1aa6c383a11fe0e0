"""The planner's last step (shardmesh/eplb.py): a local search that lowers the busiest server's
load by moving, swapping, adding and dropping replicas around it, within every server's slots.
Pure Python, like the planner. `weights`: (layer, expert) -> load; `replicas`: (layer, expert) ->
the servers holding it (edited in place); `slots`: server -> replicas it may hold."""

ExpertKey = tuple[int, int]  # (layer, expert)


def refine(weights, replicas: dict[ExpertKey, list[str]], servers, slots, max_rounds: int = 2_000) -> None:
    """Local search on `replicas` (in place): apply the best of these changes around the busiest
    server while every server they touch ends below its load (so the top of the sorted load
    vector strictly falls): move one of its replicas to a server with a free slot; swap one with a
    lighter replica elsewhere; add a replica of one of its experts on a server with a free slot;
    drop its replica of an expert that has others; turn a replica of another expert that has
    spares into one of its experts'."""
    for _ in range(max_rounds):
        totals = {name: 0.0 for name in servers}
        held: dict[str, set[ExpertKey]] = {name: set() for name in servers}
        for key, holders in replicas.items():
            for name in holders:
                totals[name] += weights[key] / len(holders)
                held[name].add(key)
        busiest = max(servers, key=lambda n: totals[n])
        peak = totals[busiest]
        if peak <= 0:
            return
        best_change, best_top = None, peak * (1 - 1e-9)
        for change in _changes(weights, replicas, held, busiest, servers, slots):
            deltas: dict[str, float] = {}
            for key, old, new in change:
                for name, delta in _holder_deltas(weights[key], old, new).items():
                    deltas[name] = deltas.get(name, 0.0) + delta
            top = max(totals[name] + delta for name, delta in deltas.items())
            if deltas.get(busiest, 0.0) < 0 and top < best_top:
                best_change, best_top = change, top
        if best_change is None:
            return
        for key, _, new in best_change:
            replicas[key] = list(new)


def _holder_deltas(weight: float, old: tuple[str, ...], new: tuple[str, ...]) -> dict[str, float]:
    """Load change of each server when an expert's holders go from `old` to `new`."""
    deltas = {name: -weight / len(old) for name in old}
    for name in new:
        deltas[name] = deltas.get(name, 0.0) + weight / len(new)
    return deltas


def _changes(weights, replicas, held, busiest, servers, slots):
    """Candidate changes, each a list of (key, old holders, new holders)."""
    def without(holders, name):
        return tuple(n for n in holders if n != name)

    for key in held[busiest]:
        holders = tuple(replicas[key])
        if len(holders) > 1:  # drop this replica: the others take its share
            yield [(key, holders, without(holders, busiest))]
        for other in servers:
            if other in holders:
                continue
            free = len(held[other]) < slots[other]
            if free:  # move it; or add a replica there
                yield [(key, holders, without(holders, busiest) + (other,))]
                yield [(key, holders, holders + (other,))]
            for back in held[other]:
                back_holders = tuple(replicas[back])
                if busiest not in back_holders and weights[back] / len(back_holders) < weights[key] / len(holders):
                    yield [(key, holders, without(holders, busiest) + (other,)),
                           (back, back_holders, without(back_holders, other) + (busiest,))]
                if len(back_holders) > 1 and back != key:  # a spare replica of `back` becomes one of `key`
                    yield [(back, back_holders, without(back_holders, other)), (key, holders, holders + (other,))]
