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
  Except a tensor-parallel stage whose every rank is still held by a live (or restarted) shard:
  its group re-forms (stage_server/tp_membership.py); the router waits for it (`_tp_reformed`)
  and replays the running sequences on it, as above.

Bounds (how fast a lost stage is noticed):
- killed: at once (connection reset or refused), plus the probe's refused connection (milliseconds);
- frozen (SIGSTOP) during a step: the step's deadline at that stage, --step-timeout (default 10 s)
  + STEP_SECONDS_PER_TOKEN (0.05 s) x the step's tokens (router/pipeline.py), or on the gRPC data
  plane gRPC keepalive if sooner (STAGE_CHANNEL_OPTIONS: a ping every 2 s, 3 s to answer, ~5 s);
  then the probe, at most PROBE_TIMEOUT_S. So at most step deadline + 3 s (tests: 3 s + 3 s);
- while idle: on the gRPC data plane its Step stream breaks (killed: at once; frozen: keepalive,
  ~5 s) and the same handling follows; on any plane the idle prober (router/stage_health.py)
  hands it here after 3 missed health probes (killed ~1.5 s, frozen ~7.5 s)."""

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh.grpc_util import open_channel

from router.tp_ranks import LEASE_S

log = logging.getLogger(__name__)
# A TP stage that lost a shard re-forms (its shards ask the router every second): the router waits
# while every rank's shard asked within TP_HEARD_S (the rank's lease: a shard restarted under its id
# within it gets its rank back), at most TP_REFORM_WAIT_S; a dead shard not restarted lets the
# failure through once its lease has run out (~30 s after it died).
TP_HEARD_S = LEASE_S
TP_REFORM_WAIT_S = 120.0
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
            if await self._tp_reformed(link, epoch):  # its running sequences replay on the re-formed group
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

    async def _tp_reformed(self, link, epoch: int) -> bool:
        """A tensor-parallel stage whose every rank is held by a shard that asked lately (alive, or
        restarted) re-forms its group after losing a peer (stage_server/tp_membership.py): wait for
        it, at most TP_REFORM_WAIT_S, rather than drop it. True once it serves again: at the same
        address (a new epoch: the running sequences replay), or registered at another (rank 0
        restarted: the registration made the new link and epoch). False at once for other stages."""
        ranks, pipeline, loop = self.state.cluster.tp_ranks, self.state.pipeline, asyncio.get_running_loop()
        deadline = loop.time() + TP_REFORM_WAIT_S
        if ranks.all_heard(link.name, TP_HEARD_S):
            log.warning("stage %s: its tensor-parallel group is re-forming (every rank's shard asked within "
                        "%.0f s): waiting up to %.0f s for it", link.name, TP_HEARD_S, TP_REFORM_WAIT_S)
        while ranks.all_heard(link.name, TP_HEARD_S) and loop.time() < deadline:
            if pipeline.epoch != epoch or link not in pipeline.links:
                return True
            if await self._alive(link.address):
                log.warning("stage %s: its tensor-parallel group re-formed: replaying running sequences", link.name)
                pipeline.epoch += 1
                return True
            await asyncio.sleep(0.2)
        return False

    async def _alive(self, address: str) -> bool:
        try:
            async with open_channel(address, self.state.security) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                        timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
