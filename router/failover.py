"""StageFailover: what the router does when a stage stops answering.

A step that fails on the transport (connection refused or reset, the step's deadline passed,
keepalive gave up) raises `StageLost` in router/pipeline.py, which calls this. It probes the
stage's grpc.health.v1 with a short deadline:

- it answers SERVING: the server lives (a broken stream, a slow step); only the KV caches may be
  out of step, so the pipeline's epoch goes up and every running sequence is replayed on it;
- it does not: the server is dead or frozen (SIGSTOP: the kernel still accepts the connection, the
  process answers nothing). It is dropped from the cluster map. Its first standby takes the
  position (a new epoch: the scheduler frees each running sequence everywhere and replays its
  tokens), or, when none is left, the pipeline is marked broken: every step fails UNAVAILABLE at
  once, health turns NOT_SERVING and Generate refuses new requests, naming what cannot be served.

Bounds (how fast a lost stage is noticed):
- killed: at once (connection reset or refused), plus the probe's refused connection (milliseconds);
- frozen (SIGSTOP) during a step: the step's deadline at that stage, --step-timeout (default 10 s)
  + STEP_SECONDS_PER_TOKEN (0.05 s) x the step's tokens (router/pipeline.py), or on the gRPC data
  plane gRPC keepalive if sooner (STAGE_CHANNEL_OPTIONS: a ping every 2 s, 3 s to answer, ~5 s);
  then the probe, at most PROBE_TIMEOUT_S. So at most step deadline + 3 s (tests: 3 s + 3 s);
- while idle: on the gRPC data plane its Step stream breaks (killed: at once; frozen: keepalive,
  ~5 s) and the same handling follows; otherwise at the next step."""

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh.grpc_util import open_channel

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0  # a live stage answers a health check in milliseconds; 3 s holds at load ~10


class StageFailover:
    def __init__(self, state):
        self.state = state  # router.main.RouterState
        self.lock = asyncio.Lock()  # one failure handled at a time; later reports of it find it handled
        self.failovers = 0  # standbys that took over

    async def __call__(self, link, error, epoch: int) -> None:
        """`link` (a StageLink) failed a step sent at pipeline epoch `epoch` with `error` (StageLost)."""
        state, pipeline, cluster = self.state, self.state.pipeline, self.state.cluster
        async with self.lock:
            if pipeline.epoch != epoch or link not in pipeline.links:
                return  # handled already: another lane's step, or the idle stream, reported it first
            if await self._alive(link.address):
                log.warning("stage %s (%s) failed a step but answers health checks: replaying running "
                            "sequences on it (%s)", link.name, link.address, error.message)
                pipeline.epoch += 1
                return
            async with state.registry_lock:
                active = cluster.drop_replica(link.name, link.address, f"stopped answering ({error.message})")
                if active:
                    log.warning("stage %s: %s stopped answering (%s); standby %s takes over, running sequences "
                                "replay their tokens", link.name, link.address, error.message, active)
                    self.failovers += 1
                else:
                    log.error("stage %s: %s, its last server, stopped answering (%s): cannot serve",
                              link.name, link.address, error.message)
                await state.on_cluster_change()  # a new link and epoch, or `broken`; health follows

    async def _alive(self, address: str) -> bool:
        try:
            async with open_channel(address, self.state.security) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                        timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
