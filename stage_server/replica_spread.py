"""How one expert's tokens are spread over its replicas: least outstanding work, not round robin.

    spread(num_tokens=40, addresses=("a", "b"), in_flight={"a": 10, "b": 0}, min_chunk=8)
    -> [("b", 25), ("a", 15)]      # both end with 25 tokens outstanding

Water-filling: the replicas with the fewest tokens in flight are topped up to one common level,
so that after this expert every replica used has as close to the same outstanding work as whole
tokens allow. A group is only cut into chunks of at least `min_chunk` tokens (a tiny chunk costs
more in message and kernel overhead than it saves); a group too small to cut goes whole to the
least-loaded replica. Ties go to the replica `offset` places into the list (callers rotate it),
so that equal replicas take turns."""


def spread(num_tokens: int, addresses: tuple[str, ...], in_flight: dict[str, int], min_chunk: int,
           offset: int = 0) -> list[tuple[str, int]]:
    """[(address, tokens)] with distinct addresses, tokens >= 1 summing to num_tokens, rows in
    that order (the first chunk takes the group's first rows)."""
    assert addresses and num_tokens >= 1 and min_chunk >= 1, (addresses, num_tokens, min_chunk)
    start = offset % len(addresses)
    rotated = addresses[start:] + addresses[:start]
    order = sorted(rotated, key=lambda a: in_flight.get(a, 0))  # stable: rotation breaks ties
    loads = [in_flight.get(a, 0) for a in order]
    for used in range(min(len(order), max(1, num_tokens // min_chunk)), 0, -1):
        # The level that `used` least-loaded replicas reach together; drop replicas already above it.
        while used > 1 and (num_tokens + sum(loads[:used])) / used < loads[used - 1]:
            used -= 1
        level, remainder = divmod(num_tokens + sum(loads[:used]), used)
        counts = [level - loads[i] + (1 if i < remainder else 0) for i in range(used)]
        if used == 1 or min(counts) >= min_chunk:
            return [(order[i], counts[i]) for i in range(used) if counts[i] > 0]
    raise AssertionError("unreachable: one replica always takes the whole group")


def sole_servers(replicas: dict[tuple[int, int], tuple[str, ...]]) -> dict[int, tuple[str, frozenset[int]]]:
    """Placement replicas ((layer, expert) -> addresses) -> {layer: (address, its experts)} for each
    layer whose every expert has one replica, all on that one server: its calls need no spreading.

    sole_servers({(0, 0): ("a",), (0, 1): ("a",), (1, 0): ("a", "b")}) -> {0: ("a", frozenset({0, 1}))}"""
    by_layer: dict[int, tuple[set[str], set[int], bool]] = {}
    for (layer, expert), addresses in replicas.items():
        servers, experts, single = by_layer.setdefault(layer, (set(), set(), True))
        servers.update(addresses)
        experts.add(expert)
        if len(addresses) != 1:
            by_layer[layer] = (servers, experts, False)
    return {layer: (next(iter(servers)), frozenset(experts)) for layer, (servers, experts, single) in by_layer.items()
            if single and len(servers) == 1}
