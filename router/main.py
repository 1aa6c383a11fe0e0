"""Run the router: the public API, the registry, the scheduler loop."""

import asyncio
import logging

import grpc

from shardmesh import grpc_util
from shardmesh.grpc_util import CONTROL_DEADLINE_S
from shardmesh.scheduler import Scheduler
from shardmesh.serve import DEFAULT_PREFILL_CHUNK_TOKENS
from shardmesh.service_config import ServiceConfig
from shardmesh.telemetry import metrics
from shardmesh.text import TextCodec
from shardmesh.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc, stage_pb2_grpc

from router.admin import AdminServicer
from router.admission import AdmissionGate
from router.auto_rebalance import AutoRebalanceConfig, AutoRebalancer
from router.caller_limit import CallerLimit
from router.cluster import ClusterMap
from router.expert_health import ExpertProber
from router.failover import StageFailover
from router.pipeline import DEFAULT_STEP_TIMEOUT_S, StagePipeline
from router.servicer import RegistryServicer, RouterServicer
from router.stage_health import IdleStageProber
from router.standby_health import StandbyProber
from router.tarpit import Tarpit, TarpitConfig

log = logging.getLogger(__name__)
SERVICE_NAMES = [router_pb2.DESCRIPTOR.services_by_name[s].full_name for s in ("Router", "Registry")] + [
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name]
DEFAULT_MAX_QUEUED = 256  # requests waiting for a batch slot; past it Generate gets RESOURCE_EXHAUSTED
# The router receives prompts and registrations, never activations (those arrive as responses on
# its own channels): a request over this is refused before it is buffered.
MAX_REQUEST_BYTES = 8 * 2**20
# On SIGTERM the router stops admitting and waits this long for streams in flight to finish.
DEFAULT_SHUTDOWN_GRACE_S = 20.0


class RouterState:
    """Everything the router's servicers share."""

    def __init__(self, config: ServiceConfig, max_context: int, max_batch_sequences: int,
                 max_queued: int = DEFAULT_MAX_QUEUED, micro_batches: int = 0,
                 prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
                 step_timeout: float = DEFAULT_STEP_TIMEOUT_S):
        self.config = config.model
        self.security = config.security
        self.max_queued = max_queued
        self.caller_limit = CallerLimit(0)  # start_router sets --max-sequences-per-caller
        self.tarpit = None  # router/tarpit.py, when start_router is given one
        self.cluster = ClusterMap(config.topology, config.model)
        self.text = TextCodec.from_model_dir(config.model_dir)
        self.max_context = max_context
        self.pipeline = StagePipeline(config.security, data_plane=config.data_plane, step_timeout=step_timeout)
        self.failover = self.pipeline.on_stage_lost = StageFailover(self)  # a stage stops answering
        # Micro-batches in flight: one per stage unless said otherwise (fills the pipeline).
        self.scheduler = Scheduler(self.pipeline, max_batch_sequences, micro_batches or len(config.topology.stages),
                                   prefill_chunk_tokens)
        self.registry_lock = asyncio.Lock()
        metrics.watch_router(self)  # queue depth and batch, read at scrape time
        self.serving = False
        self.draining = False  # SIGTERM: no new requests, the ones in flight finish (RouterServer.stop)
        self.health = None
        self.auto_rebalancer = None  # router/auto_rebalance.py, when started with auto_rebalance
        self.expert_prober = None    # router/expert_health.py
        self.standby_prober = None   # router/standby_health.py, when a stage has standbys
        self.stage_prober = None     # router/stage_health.py: active stages that die while idle

    async def on_cluster_change(self) -> None:
        """After a registration or a health verdict (router/expert_health.py): reconnect stages and,
        while the mesh can serve (ClusterMap.unservable), push the placement; health follows."""
        await self.pipeline.connect([(n, a) for n, a in self.cluster.stage_addresses() if a])
        reasons = self.cluster.unservable()
        self.pipeline.broken = "; ".join(reasons)  # steps fail at once, naming what is missing
        if reasons:
            if self.serving:
                log.error("not serving: %s", "; ".join(reasons))
            self.serving = False
            await grpc_util.set_serving(self.health, SERVICE_NAMES, False)
            return
        placement = self.cluster.placement()
        for name, address in self.cluster.stage_addresses(standbys=True):  # a standby is ready when it takes over
            async with grpc_util.open_channel(address, self.security) as channel:
                try:
                    await stage_pb2_grpc.StageStub(channel).UpdatePlacement(placement, timeout=CONTROL_DEADLINE_S)
                except grpc.aio.AioRpcError as error:
                    log.error("pushing placement v%d to %s failed: %s", placement.version, name, error.details())
                    return
        if self.draining:
            return
        if not self.serving:
            log.info("every server registered: serving")
        self.serving = True
        await grpc_util.set_serving(self.health, SERVICE_NAMES, True)

    def unavailable_reason(self) -> str:
        """Why Generate refuses requests now (while not serving)."""
        if self.draining:
            return "the router is shutting down: retry on another router"
        reasons = self.cluster.unservable() or ["placement not pushed to every stage yet"]
        return f"the mesh cannot serve: {'; '.join(reasons)}"

    def admission_full(self) -> bool:
        """True when `max_queued` requests already wait for a batch slot (bounds the router's memory)."""
        scheduler = self.scheduler
        return scheduler.active >= scheduler.max_batch_sequences + self.max_queued


class RouterServer:
    def __init__(self, server, port: int, state: RouterState):
        self.server, self.port, self.state = server, port, state

    async def stop(self, grace: float | None = 1.0) -> None:
        """Drain: NOT_SERVING and new requests refused at once; streams in flight may finish within
        `grace` s (None: cancelled now); then stop."""
        self.state.draining, self.state.serving = True, False
        await grpc_util.set_serving(self.state.health, SERVICE_NAMES, False)
        if grace:
            await self.state.scheduler.wait_idle(grace)
        await self.server.stop(min(grace, 1.0) if grace else grace)  # then flush the last responses
        if self.state.auto_rebalancer is not None:
            await self.state.auto_rebalancer.stop()
        if self.state.expert_prober is not None:
            await self.state.expert_prober.stop()
        if self.state.standby_prober is not None:
            await self.state.standby_prober.stop()
        if self.state.stage_prober is not None:
            await self.state.stage_prober.stop()
        await self.state.scheduler.stop()
        await self.state.pipeline.close()


async def start_router(config: ServiceConfig, max_context: int = 0, max_batch_sequences: int = 64,
                       max_queued: int = DEFAULT_MAX_QUEUED, micro_batches: int = 0,
                       prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
                       auto_rebalance: AutoRebalanceConfig | None = None,
                       step_timeout: float = DEFAULT_STEP_TIMEOUT_S, max_sequences_per_caller: int = 0,
                       caller_identity: str = "host", tarpit: TarpitConfig | None = None) -> RouterServer:
    """micro_batches: steps in flight through the pipeline (0 = one per stage); prefill_chunk_tokens:
    prompt tokens per micro-batch step (0 = whole prompts). See shardmesh.scheduler.
    auto_rebalance: re-place experts when the load stays imbalanced (router/auto_rebalance.py).
    step_timeout: base seconds of a step's deadline at each stage (router/pipeline.py, failover.py).
    max_sequences_per_caller (0 = no limit), caller_identity: see router/caller_limit.py.
    tarpit: hold the refusals of callers refused too often (router/tarpit.py; None = off)."""
    caller_limit = CallerLimit(max_sequences_per_caller, caller_identity,  # raises ValueError when invalid
                               config.security.accepted_client_tokens)
    model_limit = config.model.max_position_embeddings
    if max_context > model_limit:
        raise ValueError(f"max_context {max_context} exceeds the model's max_position_embeddings {model_limit}")
    if micro_batches < 0 or prefill_chunk_tokens < 0:
        raise ValueError(f"micro_batches {micro_batches} and prefill_chunk_tokens {prefill_chunk_tokens} must be >= 0")
    if step_timeout <= 0:
        raise ValueError(f"step_timeout {step_timeout} must be > 0")
    if max_queued < 0 or max_batch_sequences < 1:
        raise ValueError(f"max_queued {max_queued} must be >= 0 and max_batch_sequences {max_batch_sequences} >= 1")
    state = RouterState(config, max_context or model_limit, max_batch_sequences, max_queued, micro_batches,
                        prefill_chunk_tokens, step_timeout)
    state.caller_limit = caller_limit
    state.tarpit = Tarpit(tarpit) if tarpit is not None else None
    server = grpc_util.new_server(config.security, max_receive_bytes=MAX_REQUEST_BYTES,  # a refusal under
                                  interceptors=[AdmissionGate(state)])  # overload costs ~nothing
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(state), server)
    router_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(state), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(state), server)
    state.health = grpc_util.add_health_and_reflection(server, SERVICE_NAMES)
    await grpc_util.set_serving(state.health, SERVICE_NAMES, False)
    port = grpc_util.bind(server, config.host, config.port, config.security)
    await server.start()
    state.scheduler.start()
    if auto_rebalance is not None:
        state.auto_rebalancer = AutoRebalancer(state, AdminServicer(state).rebalancer, auto_rebalance).start()
    if config.model.is_moe:
        state.expert_prober = ExpertProber(state).start()
    if any(spec.standbys for spec in state.cluster.topology.stages):
        state.standby_prober = StandbyProber(state).start()
    state.stage_prober = IdleStageProber(state).start()
    log.info("router listening on %s:%d, waiting for %s", config.host, port, state.cluster.missing())
    return RouterServer(server, port, state)
