"""ExpertProber: the router's watch over the liveness of every expert server replica.

Each registered expert server address is probed on grpc.health.v1 every PROBE_PERIOD_S, each
address by its own task (a frozen server does not slow the probes of the others). FAILURES_TO_DOWN
failed probes in a row (refused, NOT_SERVING, or no answer within PROBE_DEADLINE_S) mark it
unreachable: the cluster map leaves it out of the placement, a new placement version goes to every
stage, and where it held the last replica of an expert the router turns NOT_SERVING
(ClusterMap.unservable names what is missing). One SERVING answer brings it back the same way; a
replica that restarts and registers again is back at once (ClusterMap.register).

Stages do not wait for this: a call that fails is re-sent to another replica within the same step
(stage_server/remote_experts.py). The probes keep every stage's placement free of the dead
replica afterwards, and bring it back.

Bounds (tests rely on them; they hold at load average ~10-20 on 2 cores, where a live process
answers a health check in well under PROBE_DEADLINE_S, so three misses in a row mean a dead or
frozen server; a miss that the router's own late event loop explains is not counted):
  dead (connection refused): out of the placement ~FAILURES_TO_DOWN * PROBE_PERIOD_S after it died;
  frozen (SIGSTOP): ~FAILURES_TO_DOWN * (PROBE_PERIOD_S + PROBE_DEADLINE_S) after it froze;
  back: ~PROBE_PERIOD_S after it answers again;
each plus the push to the stages (which waits for a step in progress to end)."""

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh.grpc_util import open_channel

log = logging.getLogger(__name__)
PROBE_PERIOD_S = 0.5
PROBE_DEADLINE_S = 2.0
FAILURES_TO_DOWN = 3
LATE_S = 1.0  # a failed probe that took this much longer than its deadline is not counted (see below)
# Reconnect soon after a failure, so that a server back at the same address is seen within ~1 s.
PROBE_CHANNEL_OPTIONS = {"grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1_000}


class ExpertProber:
    def __init__(self, state, period: float = PROBE_PERIOD_S, deadline: float = PROBE_DEADLINE_S,
                 failures_to_down: int = FAILURES_TO_DOWN, channel_options: dict | None = None):
        self.state = state  # router.main.RouterState
        self.period, self.deadline, self.failures_to_down = period, deadline, failures_to_down
        self.channel_options = PROBE_CHANNEL_OPTIONS if channel_options is None else channel_options
        self._probes: dict[str, asyncio.Task] = {}  # address -> its probe loop
        self._task: asyncio.Task | None = None

    def start(self) -> "ExpertProber":
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="expert-prober")
        return self

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._probes.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task, self._probes = None, {}

    def _registered(self) -> set[str]:
        cluster = self.state.cluster
        return {a for spec in cluster.topology.expert_servers for a in cluster.servers[spec.name].addresses}

    async def _watch(self) -> None:
        """Keep one probe loop per registered expert server address."""
        while True:
            registered = self._registered()
            for address in set(self._probes) - registered:  # replaced by a re-registration
                self._probes.pop(address).cancel()
                self.state.cluster.unreachable.discard(address)
            for address in registered - {a for a, task in self._probes.items() if not task.done()}:
                self._probes[address] = asyncio.get_running_loop().create_task(
                    self._probe_loop(address), name=f"expert-probe-{address}")
            await asyncio.sleep(self.period)

    async def _probe_loop(self, address: str) -> None:
        while True:
            await self._probe_channel(address)

    async def _probe_channel(self, address: str) -> None:
        """Probe `address` on one channel until the server registers again after a verdict of
        unreachable. That server is new and gets a new channel: the old one, refused while it was
        down, may wait out a reconnect backoff (up to max_reconnect_backoff_ms) failing every probe
        at once, and three of those would drop the server that just registered."""
        failures = 0
        # its own subchannel: another channel to the address with the same options would share the
        # process-wide pool's subchannel, backoff included
        options = {**self.channel_options, "grpc.use_local_subchannel_pool": 1}
        async with open_channel(address, self.state.security, options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                failure = await self._probe(health)
                if failure and loop.time() - started > self.deadline + LATE_S:
                    # The router's own loop was held up past the deadline (a long step, a paused
                    # test loop): the miss says nothing of the server. Ask again.
                    await asyncio.sleep(self.period)
                    continue
                unreachable = self.state.cluster.unreachable
                if failures >= self.failures_to_down and address not in unreachable:
                    return  # it registered again since our verdict: a new server, on a new channel
                failures = failures + 1 if failure else 0
                if (failures >= self.failures_to_down) != (address in unreachable):
                    try:
                        await self._verdict(address, not failure, failure)
                    except Exception:  # a bug here must not end this server's probes
                        log.exception("applying the health verdict on %s failed", address)
                await asyncio.sleep(self.period)

    async def _probe(self, health) -> str:
        """Why the server failed this probe ('' when it answered SERVING)."""
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.deadline)
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return ""

    async def _verdict(self, address: str, reachable: bool, reason: str) -> None:
        async with self.state.registry_lock:  # one cluster change at a time (registrations, rebalances)
            if address not in self._registered() or not self.state.cluster.set_reachable(address, reachable):
                return
            if reachable:
                log.warning("expert server %s answers again: back in placement v%d", address,
                            self.state.cluster.placement_version)
            else:
                log.warning("expert server %s failed %d health probes (%s): left out of placement v%d", address,
                            self.failures_to_down, reason, self.state.cluster.placement_version)
            await self.state.on_cluster_change()
