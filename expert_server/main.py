"""Run one expert server: load its experts, serve, register with the router."""

import logging

from shardmesh import grpc_util
from shardmesh.checkpoint import CheckpointReader
from shardmesh.expert_model import ExpertShard
from shardmesh.service_config import ServiceConfig
from shardmesh.topology import ExpertServerSpec
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2

from expert_server.servicer import ExpertServicer

log = logging.getLogger(__name__)
SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name


async def start_expert_server(config: ServiceConfig) -> grpc_util.RunningServer:
    spec = config.topology.server(config.name)
    if not isinstance(spec, ExpertServerSpec):
        raise ValueError(f"{config.name!r} is a stage in the topology, not an expert server")
    reader = CheckpointReader(config.model_dir, device=config.device)
    log.info("%s: loading %d experts", config.name, len(spec.experts))
    shard = ExpertShard(config.model, spec.experts, reader, dtype=config.torch_dtype)
    reader.close()
    servicer = ExpertServicer(config.name, shard, config.torch_dtype)
    running = await grpc_util.start_server(servicer, expert_pb2_grpc.add_ExpertServicer_to_server, SERVICE_NAME,
                                           config.host, config.port)
    if config.router_address:
        await grpc_util.register_with_router(config.router_address, router_pb2.RegisterServerRequest(
            name=config.name, role=router_pb2.SERVER_ROLE_EXPERT, address=running.address,
            experts=[router_pb2.ExpertKey(layer=l, expert=e) for l, e in spec.experts],
            model_fingerprint=config.model.fingerprint))
    log.info("%s: expert server listening on %s", config.name, running.address)
    return running
