"""Live expert placement changes, router side: plan (or take a target), load and warm new
replicas, switch every stage to the new placement version, then drain and drop old replicas.

Safety: until every stage has acknowledged version v, every replica of v-1 and of v stays
loaded, so whichever placement a stage uses in a step, every expert it sends to is there. A stage
applies a version under its step lock (between steps), so once all have acknowledged, no call
with the old placement is in flight from a later step, and each expert server's DropExperts
still waits for its own in-flight calls (drain) before freeing weights."""

import asyncio
import logging
import math
import time

import grpc

from shardmesh.eplb import imbalance, plan_placement
from shardmesh.errors import FailedPrecondition, InvalidArgument, Unavailable
from shardmesh.grpc_util import CONTROL_DEADLINE_S, open_channel
from shardmesh.v1 import admin_pb2, expert_pb2, expert_pb2_grpc, router_pb2, stage_pb2_grpc

from router.load import check_window, collect_load

log = logging.getLogger(__name__)
LOAD_DEADLINE_S = 300.0   # LoadExperts reads weights from disk
DRAIN_TIMEOUT_S = 30.0    # how long an expert server waits for calls using experts it drops
SLOT_FACTOR = 1.25        # default budget: this times an even share of the replicas

ExpertKey = tuple[int, int]
Holdings = dict[str, set[ExpertKey]]  # address -> experts


def _invert(holdings: Holdings) -> dict[ExpertKey, tuple[str, ...]]:
    replicas: dict[ExpertKey, list[str]] = {}
    for address, keys in holdings.items():
        for key in keys:
            replicas.setdefault(key, []).append(address)
    return {key: tuple(sorted(addresses)) for key, addresses in replicas.items()}


def _server_experts(holdings: Holdings, names: dict[str, str]) -> list[admin_pb2.ServerExperts]:
    return [admin_pb2.ServerExperts(address=a, name=names.get(a, ""), experts=[
        router_pb2.ExpertKey(layer=l, expert=e) for l, e in sorted(keys)]) for a, keys in sorted(holdings.items()) if keys]


class Rebalancer:
    def __init__(self, state):
        self.state = state  # router.main.RouterState

    async def rebalance(self, request: admin_pb2.RebalanceRequest) -> admin_pb2.RebalanceResponse:
        window = check_window(request.load_window_seconds)
        if not 0 <= request.min_gain < 1:
            raise InvalidArgument("min_gain", f"{request.min_gain} is outside [0, 1)")
        config = self.state.config
        if not config.is_moe:
            raise FailedPrecondition("target", f"{config.family} is a dense model: it has no experts to place")
        started = time.monotonic()
        async with self.state.registry_lock:  # one change at a time; registrations wait
            if not self.state.serving:
                raise FailedPrecondition("router", "the mesh is not serving yet: every server must register first")
            cluster = self.state.cluster
            registered = cluster.expert_holdings()
            names = {address: name for address, (name, _) in registered.items()}
            current: Holdings = {address: set(keys) for address, (_, keys) in registered.items()}
            drain = self._drain(request.drain, names)
            snapshot = await collect_load(registered, window, self.state.security)
            load = {key: float(tokens) for key, tokens in snapshot.expert_tokens().items()}
            # A plan gives nothing to a server that did not answer for its load (down or hung).
            unreachable = set() if request.target else {s.address for s in snapshot.servers if s.error}
            active = [a for a in current if a not in drain | unreachable]
            if not active:
                raise FailedPrecondition("drain", "every expert server would be drained (or is unreachable)")
            if request.target:
                target = self._target(request.target, current, drain)
            else:
                budget = request.slots_per_server or self._default_budget(current, active)
                slots = {a: budget if a in active else 0 for a in current}
                try:
                    plan = await asyncio.to_thread(plan_placement, load, slots, _invert(current), request.min_gain)
                except ValueError as error:
                    raise FailedPrecondition("slots_per_server", str(error)) from error
                target = {a: set() for a in current}
                for key, addresses in plan.replicas.items():
                    for address in addresses:
                        target[address].add(key)
            response = admin_pb2.RebalanceResponse(
                imbalance_before=imbalance(load, _invert(current), list(current)),
                imbalance_after=imbalance(load, _invert(target), active),
                loaded=_server_experts({a: target[a] - current[a] for a in current}, names),
                dropped=_server_experts({a: current[a] - target[a] for a in current}, names))
            response.changed = target != current and not request.dry_run
            notes = [f"unreachable, planned empty: {sorted(unreachable)}"] if unreachable else []
            if response.changed:
                notes.append(await self._apply(current, target))
            response.note = "; ".join(n for n in notes if n)
            response.placement.extend(_server_experts(target, names))  # for dry_run: the plan
            response.placement_version = cluster.placement_version
        response.seconds = time.monotonic() - started
        return response

    def _drain(self, entries, names: dict[str, str]) -> set[str]:
        drain = set()
        for i, entry in enumerate(entries):
            matches = {a for a, n in names.items() if entry in (a, n)}
            if not matches:
                raise InvalidArgument(f"drain[{i}]", f"{entry!r} is no registered expert server "
                                      f"(name or host:port; have {sorted(set(names.values()))})")
            drain |= matches
        return drain

    def _default_budget(self, current: Holdings, active: list[str]) -> int:
        keys = len({key for keys in current.values() for key in keys})
        even = math.ceil(SLOT_FACTOR * keys / len(active))
        return max(even, max(len(current[a]) for a in active))

    def _target(self, entries, current: Holdings, drain: set[str]) -> Holdings:
        config = self.state.config
        target: Holdings = {address: set() for address in current}
        for i, entry in enumerate(entries):
            if entry.address not in current:
                raise InvalidArgument(f"target[{i}].address", f"{entry.address!r} is no registered expert server")
            if entry.address in drain and entry.experts:
                raise InvalidArgument(f"target[{i}].experts", f"{entry.address} is being drained: it can hold none")
            for j, key in enumerate(entry.experts):
                if key.layer >= config.num_layers or key.expert >= config.num_experts:
                    raise InvalidArgument(f"target[{i}].experts[{j}]", f"(layer {key.layer}, expert {key.expert}) "
                                          f"is outside {config.num_layers} layers x {config.num_experts} experts")
                target[entry.address].add((key.layer, key.expert))
        held = {key for keys in target.values() for key in keys}
        missing = [(l, e) for l in range(config.num_layers) for e in range(config.num_experts) if (l, e) not in held]
        if missing:
            raise InvalidArgument("target", f"no server holds {missing[:4]}{'...' if len(missing) > 4 else ''}")
        return target

    async def _expert_call(self, address: str, method: str, request, timeout: float):
        async with open_channel(address, self.state.security) as channel:
            return await getattr(expert_pb2_grpc.ExpertStub(channel), method)(request, timeout=timeout)

    async def _push_placement(self) -> list[str]:
        """Send the cluster map's placement to every stage; the failures, as text."""
        placement = self.state.cluster.placement()

        async def one(name: str, address: str) -> str:
            try:
                async with open_channel(address, self.state.security) as channel:
                    await stage_pb2_grpc.StageStub(channel).UpdatePlacement(placement, timeout=CONTROL_DEADLINE_S)
            except grpc.aio.AioRpcError as error:
                return f"{name} ({address}): {error.code().name} {error.details()}"
            return ""

        results = await asyncio.gather(*(one(n, a) for n, a in self.state.cluster.stage_addresses(standbys=True)))
        return [r for r in results if r]

    async def _apply(self, current: Holdings, target: Holdings) -> str:
        """Load + warm, switch, drain + drop. Raises (placement unchanged) if loading or the
        switch fails; returns a note if only dropping failed (those replicas stay loaded)."""
        def keys(k):
            return [router_pb2.ExpertKey(layer=l, expert=e) for l, e in sorted(k)]

        to_load = {a: target[a] - current[a] for a in target if target[a] - current[a]}
        loads = await asyncio.gather(*(self._expert_call(a, "LoadExperts", expert_pb2.LoadExpertsRequest(
            experts=keys(k)), LOAD_DEADLINE_S) for a, k in to_load.items()), return_exceptions=True)
        failed = [f"{a}: {r.code().name} {r.details()}" if isinstance(r, grpc.aio.AioRpcError) else f"{a}: {r!r}"
                  for a, r in zip(to_load, loads) if isinstance(r, BaseException)]
        if failed:
            await self._drop({a: k for (a, k), r in zip(to_load.items(), loads) if not isinstance(r, BaseException)})
            raise Unavailable("target", f"loading new replicas failed, placement unchanged: {'; '.join(failed)}")

        cluster = self.state.cluster
        version = cluster.set_expert_placement({a: tuple(k) for a, k in target.items()})
        failed = await self._push_placement()
        if failed:
            # Every old and new replica is still loaded: go back to the old placement as a newer version.
            cluster.set_expert_placement({a: tuple(k) for a, k in current.items()})
            undo = await self._push_placement()
            raise Unavailable("stage", f"placement v{version} did not reach {'; '.join(failed)}; rolled back to the "
                              f"old placement as v{cluster.placement_version}"
                              + (f" (also unreachable: {'; '.join(undo)})" if undo else "")
                              + "; the new replicas stay loaded")
        log.info("placement v%d in force: %d servers loaded experts", version, len(to_load))
        return await self._drop({a: current[a] - target[a] for a in current if current[a] - target[a]})

    async def _drop(self, to_drop: Holdings) -> str:
        """DropExperts (drain first) on each server; what failed, as a note ('' if nothing)."""
        requests = {a: expert_pb2.DropExpertsRequest(experts=[router_pb2.ExpertKey(layer=l, expert=e) for l, e in sorted(k)],
                                                      drain_timeout_seconds=DRAIN_TIMEOUT_S) for a, k in to_drop.items()}
        results = await asyncio.gather(*(self._expert_call(a, "DropExperts", r, DRAIN_TIMEOUT_S + CONTROL_DEADLINE_S)
                                         for a, r in requests.items()), return_exceptions=True)
        failed = [f"dropping on {a} failed ({r.code().name if isinstance(r, grpc.aio.AioRpcError) else r!r}): "
                  "those replicas stay loaded" for a, r in zip(requests, results) if isinstance(r, BaseException)]
        for note in failed:
            log.warning(note)
        return "; ".join(failed)
