"""Automatic rebalancing: the router checks the expert load every `interval_s` and re-places
experts (router/rebalance.py, planned) once the imbalance has stayed above `threshold` for
`patience` checks in a row.

The imbalance checked is the planner's: the window's load per (layer, expert), spread over the
replicas of the current placement, busiest server / mean. It depends on the placement in force,
not on where past tokens went, so right after a rebalance it reflects the new placement and the
loop does not oscillate; `min_gain` keeps a plan that would barely help from moving weights."""

import asyncio
import dataclasses
import logging

from shardmesh.eplb import imbalance
from shardmesh.errors import RequestError
from shardmesh.v1 import admin_pb2

from router.load import collect_load

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AutoRebalanceConfig:
    threshold: float              # rebalance when busiest / mean stays above this (> 1)
    interval_s: float = 30.0      # between checks
    window_s: float = 120.0       # load window each check and plan uses
    patience: int = 3             # checks in a row above the threshold before acting
    min_gain: float = 0.05        # see RebalanceRequest.min_gain
    min_tokens: int = 1000        # ignore windows with fewer routed tokens than this (idle mesh)

    def __post_init__(self):
        if not self.threshold > 1:
            raise ValueError(f"auto-rebalance threshold {self.threshold} must be > 1 (1 = perfectly even)")
        if not (self.interval_s > 0 and 0 < self.window_s <= 600 and self.patience >= 1 and 0 <= self.min_gain < 1):
            raise ValueError(f"auto-rebalance: bad interval {self.interval_s}, window {self.window_s}, "
                             f"patience {self.patience} or min_gain {self.min_gain}")


class AutoRebalancer:
    def __init__(self, state, rebalancer, config: AutoRebalanceConfig):
        self.state, self.rebalancer, self.config = state, rebalancer, config  # state: router.main.RouterState
        self.streak = 0
        self.rebalances = 0
        self._task: asyncio.Task | None = None

    def start(self) -> "AutoRebalancer":
        self._task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.check()
            except Exception:  # a failed check must not end the loop: log it, try again next time
                log.exception("auto-rebalance check failed")

    async def current_imbalance(self) -> float | None:
        """The planner's imbalance of the current placement under the window's load (None: too little load)."""
        holdings = self.state.cluster.expert_holdings()
        snapshot = await collect_load(holdings, self.config.window_s, self.state.security)
        load = snapshot.expert_tokens()
        if sum(load.values()) < self.config.min_tokens:
            return None
        replicas: dict[tuple[int, int], list[str]] = {}
        for address, (_, keys) in holdings.items():
            for key in keys:
                replicas.setdefault(key, []).append(address)
        return imbalance(load, replicas, list(holdings))

    async def check(self) -> bool:
        """One check; True if it rebalanced."""
        if not self.state.serving or not self.state.config.is_moe:
            return False
        value = await self.current_imbalance()
        self.streak = self.streak + 1 if value is not None and value > self.config.threshold else 0
        if self.streak < self.config.patience:
            return False
        self.streak = 0
        try:
            reply = await self.rebalancer.rebalance(admin_pb2.RebalanceRequest(
                load_window_seconds=self.config.window_s, min_gain=self.config.min_gain))
        except RequestError as error:
            log.warning("auto-rebalance at imbalance %.2f failed: %s", value, error)
            return False
        self.rebalances += reply.changed
        log.info("auto-rebalance at imbalance %.2f: %s (%.2f -> %.2f, v%d)", value,
                 "changed" if reply.changed else "kept", reply.imbalance_before, reply.imbalance_after,
                 reply.placement_version)
        return reply.changed
