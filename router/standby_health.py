"""StandbyProber: the router's watch over the stages' standbys (topology `standbys = N`).

A standby serves no step until its stage's active server dies (router/failover.py), so nothing
else would notice that it died too, and the failover would then pick a dead server. Each standby
address is probed on grpc.health.v1 like an expert server (router/expert_health.py: same period,
deadline, misses in a row, and the same allowance for the router's own late loop). One that fails
FAILURES_TO_DOWN probes in a row is dropped from its stage's replicas: failover skips it, and the
placement is no longer pushed to it (a push to a dead standby would fail every cluster change).
It comes back by registering again, which every stage does every few seconds
(shardmesh/registration.py): a standby that was frozen and resumes, or one restarted at any
address, is back in the stage's replicas, last in line, with the current placement pushed to it.

Bounds: a killed standby is dropped ~FAILURES_TO_DOWN * PROBE_PERIOD_S after it died (~1.5 s), a
frozen one ~FAILURES_TO_DOWN * (PROBE_PERIOD_S + PROBE_DEADLINE_S) after it froze (~7.5 s); one
that answers again is back within its re-registration interval (5 s by default). The active
server of a stage is not probed here: its steps and its Step stream watch it (router/failover.py).
"""

import logging

from router.expert_health import ExpertProber

log = logging.getLogger(__name__)


class StandbyProber(ExpertProber):
    def _standbys(self) -> dict[str, str]:
        """address -> stage name of every registered standby (each stage's replicas after the first)."""
        cluster = self.state.cluster
        return {address: spec.name for spec in cluster.topology.stages
                for address in cluster.servers[spec.name].addresses[1:]}

    def _registered(self) -> set[str]:
        return set(self._standbys())

    async def _verdict(self, address: str, reachable: bool, reason: str) -> None:
        if reachable:
            return  # a dropped standby is not probed: it comes back by registering (see the docstring)
        async with self.state.registry_lock:  # one cluster change at a time (registrations, failovers)
            name = self._standbys().get(address)
            if name is None:
                return  # it took over, or was dropped or replaced, meanwhile
            self.state.cluster.drop_replica(name, address, f"failed {self.failures_to_down} health probes ({reason})")
            log.warning("stage %s: standby %s failed %d health probes (%s): dropped until it registers again",
                        name, address, self.failures_to_down, reason)
            await self.state.on_cluster_change()
