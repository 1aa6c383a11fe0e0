"""Run one stage server: load its layers, serve, register with the router."""

import asyncio
import logging

import grpc

from shardmesh import grpc_util
from shardmesh.checkpoint import CheckpointReader
from shardmesh.registration import RouterRegistration
from shardmesh.service_config import ServiceConfig
from shardmesh.service_start import keep_registered, own_spec
from shardmesh.shm_allreduce import host_id
from shardmesh.shm_server import Method, start_data_plane
from shardmesh.stage_model import StageModel
from shardmesh.topology import StageSpec
from shardmesh.tp_group import TPJoinError
from shardmesh.v1 import router_pb2, stage_pb2, stage_pb2_grpc

from stage_server.remote_experts import RemoteExperts
from stage_server.servicer import StageServicer
from stage_server.tp_link import LazyGroup, join_stage_group
from stage_server.tp_membership import GroupMembership
from stage_server.tp_rank import RouterRanks

log = logging.getLogger(__name__)
SERVICE_NAME = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name


async def start_stage_server(config: ServiceConfig) -> grpc_util.RunningServer:
    spec = own_spec(config, StageSpec)
    rank = None if config.tp_auto_rank else spec.shard_names().index(config.name)
    # No rendezvous given: the router gives it, and the rank too with --tp-rank auto (stage_server/tp_rank.py).
    ranks = RouterRanks(config, spec, rank) if spec.tp > 1 and not config.tp_rendezvous else None
    if ranks is not None:
        rank = await ranks.ask_rank()  # before loading: the rank says which slice to load
    name = spec.shard_names()[rank]  # config.name, or "stage-1/tp1" for a shard the router made rank 1
    reader = CheckpointReader(config.model_dir, device=config.device)
    log.info("%s: loading layers [%d, %d)", name, spec.start_layer, spec.end_layer)
    tp_group = LazyGroup(rank, spec.tp) if spec.tp > 1 else None  # joins once serving (below)
    model = StageModel(config.model, spec.start_layer, spec.end_layer, reader, dtype=config.torch_dtype, tp=tp_group)
    reader.close()
    if config.max_cached_sequences < 0:
        raise ValueError(f"max_cached_sequences {config.max_cached_sequences} must be >= 0")
    model.max_cached_sequences = config.max_cached_sequences
    servicer = StageServicer(name, model, RemoteExperts(config.security, data_plane=config.data_plane,
                                                               device=config.device, flops_per_row=6.0 *
                                                               config.model.hidden_size * config.model.intermediate_size))
    servicer.host_id = config.host_id or host_id()  # advertised to TP peers (StageInfo.host_id)
    # The router's Step stream may also come over shared memory (shardmesh.shm_plane).
    plane, plane_service = await start_data_plane(name, {
        f"{SERVICE_NAME}/Step": Method(stage_pb2.StepRequest, servicer.Step, streaming=True)},
        enabled=config.data_plane == "shm")

    async def on_stop() -> None:
        if servicer.tp_fanout is not None:
            await servicer.tp_fanout.close()
        if plane is not None:
            await plane.stop()
        await servicer.experts.close()
        await servicer.backend.close()

    # SERVING once started; a step before the placement arrives gets FAILED_PRECONDITION.
    running = await grpc_util.start_server(servicer, stage_pb2_grpc.add_StageServicer_to_server, SERVICE_NAME,
                                           config.host, config.port, on_stop=on_stop, serving=tp_group is None,
                                           security=config.security, extra_services=[plane_service])
    if ranks is not None:
        running.on_stop_first(ranks.stop)
    registration = None
    if config.router_address and rank == 0:  # the router talks to rank 0 only (stage_server/tp_link.py)
        def request() -> router_pb2.RegisterServerRequest:
            return router_pb2.RegisterServerRequest(
                name=config.name, role=router_pb2.SERVER_ROLE_STAGE, address=config.advertised(running.port),
                layers=router_pb2.LayerRange(start=spec.start_layer, end=spec.end_layer),
                model_fingerprint=config.model.fingerprint, replica_id=config.replica_id,
                placement_version=servicer.experts.placement.version)

        registration = RouterRegistration(config.router_address, request, config.security, config.reregister_interval_s)
    if ranks is not None:  # the group re-forms whenever it breaks or a shard restarts (stage_server/tp_membership.py)
        membership = GroupMembership(ranks, tp_group, servicer, running, config, [SERVICE_NAME, plane_service[2]],
                                     on_reformed=registration and _RegisterNow(name, running, registration))
        await membership.start()
        if not membership.formed:
            return running  # NOT_SERVING with the reason; rank 0 registers once a later generation forms
    elif tp_group is not None:
        try:
            servicer.tp_fanout = await join_stage_group(tp_group, spec.name, config.tp_rendezvous,
                                                        config.tp_join_timeout, config.advertised(running.port),
                                                        config.security, servicer.host_id, config.tp_collective_timeout,
                                                        device=config.device)
        except TPJoinError as error:  # stays NOT_SERVING, steps get UNAVAILABLE with the reason
            log.error("%s: %s", name, error)
            servicer.not_serving_reason = str(error)
            return running
        # A group met at a fixed rendezvous cannot re-form: NOT_SERVING until every shard restarts.
        tp_group.on_break = _not_serving_on_break(name, servicer, running, [SERVICE_NAME, plane_service[2]])
        await grpc_util.set_serving(running.health, [SERVICE_NAME, plane_service[2]], True)
    if registration is not None:
        registration.kept = True  # for _RegisterNow
        await keep_registered(running, registration)
    log.info("%s: stage server listening on %s, advertised as %s", name, running.address,
             config.advertised(running.port))
    return running


class _RegisterNow:
    """GroupMembership.on_reformed of rank 0: the router hears at once that the stage serves again
    (and every few seconds from then on, when its first group had not formed)."""

    def __init__(self, name: str, running: grpc_util.RunningServer, registration: RouterRegistration):
        self.name, self.running, self.registration = name, running, registration
        registration.kept = False  # True once keep_registered runs it

    async def __call__(self) -> None:
        try:
            if self.registration.kept:
                await self.registration.register(timeout=grpc_util.CONTROL_DEADLINE_S)
            else:
                self.registration.kept = True
                await keep_registered(self.running, self.registration)
        except (TimeoutError, ConnectionError, grpc.aio.AioRpcError) as error:  # its heartbeat tries again
            log.warning("%s: registering after the re-form failed: %s", self.name, error)


def _not_serving_on_break(name: str, servicer: StageServicer, running: grpc_util.RunningServer, services: list[str]):
    """LazyGroup.on_break: a TP group that broke (called from any thread) turns the stage NOT_SERVING."""
    loop = asyncio.get_running_loop()

    def on_break(reason: str) -> None:
        log.error("%s: tensor-parallel group lost, NOT_SERVING: %s", name, reason)
        servicer.not_serving_reason = reason
        loop.call_soon_threadsafe(lambda: loop.create_task(grpc_util.set_serving(running.health, services, False)))
    return on_break
