"""IdleStageProber: the router notices an active stage server that died or froze while idle.

A stage is watched by its steps (their deadlines, router/failover.py) and, on the gRPC data plane,
by its Step stream's keepalive. On the shared-memory plane an idle stage has no stream to break,
so one frozen (SIGSTOP) or killed while no request runs was noticed only by the next request's
step, which then waited out its step deadline (--step-timeout, 10 s by default) first.

This probes each active stage server (the pipeline's links) on grpc.health.v1 like the expert
prober (router/expert_health.py: same period, deadline, misses in a row, and the allowance for the
router's own late loop), but only while the router runs no sequence: while one runs, its steps
watch the stages, and a probe that fails while a step began is not counted. A probe fails only
when the server does not answer (refused, deadline): a stage that answers NOT_SERVING is alive (a
tensor-parallel group re-forming, say) and its steps say what is wrong. FAILURES_TO_DOWN misses in
a row hand the stage to router/failover.py as a lost step would: probed once more, then replaced
by its standby or, with none left, the router turns NOT_SERVING naming the stage (GetClusterStatus
.unservable, Generate refused at once); a server continued or restarted registers again and the
router serves again.

Bounds while idle: killed, noticed ~FAILURES_TO_DOWN * PROBE_PERIOD_S (~1.5 s); frozen, noticed
~FAILURES_TO_DOWN * (PROBE_PERIOD_S + PROBE_DEADLINE_S) (~7.5 s); then failover's own probe (its
PROBE_TIMEOUT_S, 3 s): NOT_SERVING ~10.5 s after a freeze, plus a starved router's late timers.
"""

import logging

import grpc
from grpc_health.v1 import health_pb2

from router.expert_health import ExpertProber
from router.stage_link import StageLost

log = logging.getLogger(__name__)


class IdleStageProber(ExpertProber):
    def _registered(self) -> set[str]:
        return {link.address for link in self.state.pipeline.links}

    async def _probe(self, health) -> str:
        """Why the server gave no answer ('' when it answered, or when sequences run: see the docstring)."""
        if self.state.scheduler.active:
            return ""
        try:
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.deadline)
        except grpc.aio.AioRpcError as error:
            if self.state.scheduler.active:  # a step began meanwhile: its deadline decides
                return ""
            return f"{error.code().name}: {error.details()}"
        return ""

    async def _verdict(self, address: str, reachable: bool, reason: str) -> None:
        pipeline = self.state.pipeline
        link = next((link for link in pipeline.links if link.address == address), None)
        if reachable or link is None or pipeline.on_stage_lost is None or self.state.scheduler.active:
            return
        log.warning("stage %s (%s) failed %d health probes while idle (%s)", link.name, address,
                    self.failures_to_down, reason)
        await pipeline.on_stage_lost(link, StageLost("stage", f"stage {link.name} ({address}) failed "
                                                             f"{self.failures_to_down} health probes while idle "
                                                             f"({reason})"), pipeline.epoch)
