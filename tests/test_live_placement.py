"""Live expert placement changes in the middle of concurrent generations, over the real wire:
add a replica, move an expert, drain a server and remove it. Every generation completes, no token
is lost or repeated, and the tokens equal the run with no change and transformers."""

import asyncio

from mesh_helpers import local_mesh
from oracle import assert_greedy_matches, reference_greedy
from placement_helpers import (SPARE_TOPOLOGY, Generations, cluster_status, expert_addresses, expert_held,
                               expert_tokens, holdings, rebalance, target)

PROMPTS = [[1, 5, 9, 13], [1, 20, 31], [1, 7, 7, 7, 40], [1, 64, 3, 128, 77, 9]]
NEW_TOKENS = 24
NUM_LAYERS = 4


def ranked_experts(status) -> dict[int, list[tuple[int, int]]]:
    """layer -> its (layer, expert) keys, most loaded first (in the status' load window)."""
    by_layer: dict[int, list] = {}
    for load in status.expert_load:
        by_layer.setdefault(load.layer, []).append(load)
    return {layer: [(l.layer, l.expert) for l in sorted(loads, key=lambda l: (-l.tokens, l.expert))]
            for layer, loads in by_layer.items()}


def gained(after: dict, before: dict, keys) -> int:
    return sum(after.get(k, 0) - before.get(k, 0) for k in keys)


def assert_complete_and_unchanged(results, baseline, context: str) -> None:
    for i, (record, base) in enumerate(zip(results, baseline)):
        assert record.indexes == list(range(NEW_TOKENS)), f"{context} prompt {i}: indexes {record.indexes}"
        assert record.finish_reason == "length", f"{context} prompt {i}"
        assert record.tokens == base.tokens, f"{context} prompt {i}: tokens differ from the run with no change"


def test_add_move_drain_remove_during_generations(mixtral_dir):
    async def main():
        async with local_mesh(mixtral_dir, SPARE_TOPOLOGY) as mesh:
            baseline = await Generations(mesh.address, PROMPTS, NEW_TOKENS).run()  # no placement change
            status = await cluster_status(mesh.address)
            addresses, placement = expert_addresses(status), holdings(status)
            assert placement["experts-2"] == set()
            ranked = ranked_experts(status)
            hot = {layer: keys[0] for layer, keys in ranked.items()}
            second = {layer: keys[1] for layer, keys in ranked.items()}
            home = {key: name for name, keys in placement.items() for key in keys}  # one holder each
            versions = [status.placement_version]

            generations = Generations(mesh.address, PROMPTS, NEW_TOKENS)
            running = asyncio.create_task(generations.run())
            mid_flight = []

            # 1. Add a replica of each layer's hottest expert on the empty server.
            await generations.wait_first(3)
            placement["experts-2"] |= set(hot.values())
            reply = await rebalance(mesh.address, target=target(addresses, placement))
            assert reply.changed and not reply.dropped and reply.note == ""
            mid_flight.append(generations.counts())
            after_add = {name: await expert_tokens(a) for name, a in addresses.items()}

            # 2. Move each layer's second hottest expert from where it is to experts-2.
            await generations.wait_first(8)
            before_move = {name: await expert_tokens(a) for name, a in addresses.items()}
            for key in second.values():
                for name in ("experts-0", "experts-1"):
                    placement[name].discard(key)
            placement["experts-2"] |= set(second.values())
            reply = await rebalance(mesh.address, target=target(addresses, placement))
            assert reply.changed and reply.dropped and reply.note == ""
            mid_flight.append(generations.counts())
            for name in ("experts-0", "experts-1"):
                assert not await expert_held(addresses[name]) & set(second.values()), f"{name} still holds a moved expert"

            # 3. Drain experts-1 (the planner re-places its experts), then remove it.
            await generations.wait_first(14)
            reply = await rebalance(mesh.address, drain=["experts-1"], load_window_seconds=600)
            assert reply.changed and reply.note == ""
            assert await expert_held(addresses["experts-1"]) == set()
            index = next(i for i, s in enumerate(mesh.experts) if s.port == int(addresses["experts-1"].rpartition(":")[2]))
            await mesh.experts.pop(index).stop(grace=None)  # gone: nothing may be sent to it any more
            mid_flight.append(generations.counts())

            results = await running
            after = {name: await expert_tokens(addresses[name]) for name in ("experts-0", "experts-2")}
            final = await cluster_status(mesh.address)
            versions.append(final.placement_version)

            # Each change happened while generations were running.
            for counts in mid_flight:
                assert any(0 < c < NEW_TOKENS for c in counts), f"no generation in flight at a switch: {mid_flight}"
            assert versions[1] == versions[0] + 3
            assert_complete_and_unchanged(results, baseline, "with placement changes")
            # Between the add and the move, each hot expert's tokens were spread over both its
            # replicas: the new one on experts-2 and its old home.
            assert gained(before_move["experts-2"], after_add["experts-2"], hot.values()) > 0
            assert sum(gained(before_move[home[k]], after_add[home[k]], [k]) for k in hot.values()) > 0
            assert gained(after["experts-2"], before_move["experts-2"], second.values()) > 0  # moved experts served
            drained = {s.name: s for s in final.expert_servers}["experts-1"]
            assert drained.experts == 0 and drained.error  # holds nothing, and is gone
            return results

    results = asyncio.run(main())
    for i, (prompt, record) in enumerate(zip(PROMPTS, results)):
        ref_tokens, ref_logits = reference_greedy(mixtral_dir, prompt, NEW_TOKENS)
        assert_greedy_matches(record.tokens, record.logits, ref_tokens, ref_logits, context=f"prompt {i}")
