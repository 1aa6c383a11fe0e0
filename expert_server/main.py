"""Run one expert server: load its experts, serve, register with the router."""

import logging

from shardmesh import grpc_util
from shardmesh.checkpoint import CheckpointReader
from shardmesh.expert_model import ExpertShard
from shardmesh.service_config import ServiceConfig
from shardmesh.shm_server import Method, start_data_plane
from shardmesh.topology import ExpertServerSpec
from shardmesh.v1 import expert_pb2, expert_pb2_grpc

from expert_server.registration import router_registration
from expert_server.servicer import ExpertServicer

log = logging.getLogger(__name__)
SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name


async def start_expert_server(config: ServiceConfig) -> grpc_util.RunningServer:
    spec = config.topology.server(config.name)
    if not isinstance(spec, ExpertServerSpec):
        raise ValueError(f"{config.name!r} is a stage in the topology, not an expert server")
    reader = CheckpointReader(config.model_dir, device=config.device)
    log.info("%s: loading %d experts", config.name, len(spec.experts))
    shard = ExpertShard(config.model, spec.experts, reader, dtype=config.torch_dtype, slices=spec.slices)
    reader.close()
    servicer = ExpertServicer(config.name, shard, config.torch_dtype, model_dir=config.model_dir)
    # Stages on this host may call ComputeExperts over shared memory (shardmesh.shm_plane).
    plane, plane_service = await start_data_plane(config.name, {
        f"{SERVICE_NAME}/ComputeExperts": Method(expert_pb2.ComputeExpertsRequest, servicer.ComputeExperts)},
        enabled=config.data_plane == "shm", device=config.device)  # on CUDA: also CUDA IPC segments
    running = await grpc_util.start_server(servicer, expert_pb2_grpc.add_ExpertServicer_to_server, SERVICE_NAME,
                                           config.host, config.port, security=config.security,
                                           on_stop=plane.stop if plane is not None else None,
                                           extra_services=[plane_service])
    if config.router_address:  # kept up while serving: expert_server/registration.py
        registration = router_registration(config, spec, servicer, running.port)
        await registration.register()
        registration.start()
        running.on_stop_first(registration.stop)
    log.info("%s: expert server listening on %s, advertised as %s%s", config.name, running.address,
             config.advertised(running.port), f" (replica {config.replica_id})" if config.replica_id else "")
    return running
