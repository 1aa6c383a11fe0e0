"""Run one expert server: load its experts, serve, register with the router."""

import logging

from shardmesh import grpc_util
from shardmesh.checkpoint import CheckpointReader
from shardmesh.expert_model import ExpertShard
from shardmesh.service_config import ServiceConfig
from shardmesh.service_start import keep_registered, own_spec
from shardmesh.shm_server import Method, start_data_plane
from shardmesh.topology import ExpertServerSpec
from shardmesh.v1 import expert_pb2, expert_pb2_grpc

from expert_server.assignment_file import AssignmentFile
from expert_server.registration import router_registration
from expert_server.servicer import ExpertServicer

log = logging.getLogger(__name__)
SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name


async def start_expert_server(config: ServiceConfig) -> grpc_util.RunningServer:
    spec = own_spec(config, ExpertServerSpec)
    # What it held before a restart when it keeps an assignment file (assignment_file.py), else its entry's.
    assignment = (AssignmentFile(config.assignment_file, config.name, config.replica_id, config.model)
                  if config.assignment_file else None)
    stored = assignment.read() if assignment is not None else None
    experts = spec.experts if stored is None else stored  # () is an assignment too: a drained server
    reader = CheckpointReader(config.model_dir, device=config.device)
    log.info("%s: loading %d experts%s", config.name, len(experts),
             "" if experts == spec.experts else f" (its assignment, from {config.assignment_file})")
    shard = ExpertShard(config.model, experts, reader, dtype=config.torch_dtype, slices=spec.slices)
    reader.close()
    servicer = ExpertServicer(config.name, shard, config.torch_dtype, model_dir=config.model_dir)
    servicer.assignment_file = assignment
    servicer.holdings_changed()  # the file now says what this process holds
    # Stages on this host may call ComputeExperts over shared memory (shardmesh.shm_plane).
    plane, plane_service = await start_data_plane(config.name, {
        f"{SERVICE_NAME}/ComputeExperts": Method(expert_pb2.ComputeExpertsRequest, servicer.ComputeExperts)},
        enabled=config.data_plane == "shm", device=config.device,  # on CUDA: also CUDA IPC segments
        nccl=config.data_plane == "nccl")
    servicer.nccl = plane_service[0].nccl  # links stages form over DataPlane.JoinNcclGroup
    # With a router: NOT_SERVING, and ComputeExperts UNAVAILABLE, until the router has placed this server
    # holding what it assigns (a restarted replica loads its live assignment first, registration.py), so
    # neither the router's health probes nor stages count on it before it holds those experts.
    if config.router_address:
        servicer.unplaced_reason = "not placed by the router yet (registering, or loading its assigned experts)"
    running = await grpc_util.start_server(servicer, expert_pb2_grpc.add_ExpertServicer_to_server, SERVICE_NAME,
                                           config.host, config.port, security=config.security,
                                           on_stop=plane.stop if plane is not None else None,
                                           extra_services=[plane_service], serving=not config.router_address)
    if config.router_address:  # kept up while serving: expert_server/registration.py
        async def placed() -> None:
            servicer.unplaced_reason = ""
            await grpc_util.set_serving(running.health, [SERVICE_NAME, plane_service[2]], True)

        try:
            await keep_registered(running, router_registration(config, spec, servicer, running.port), placed)
        except BaseException:  # refused (or cancelled): nothing left serving behind the caller's back
            await running.stop(grace=None)
            raise
    log.info("%s: expert server listening on %s, advertised as %s%s", config.name, running.address,
             config.advertised(running.port), f" (replica {config.replica_id})" if config.replica_id else "")
    return running
