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


class ExpertServer:
    """A running expert server; `stop()` ends it."""

    def __init__(self, server, port: int, servicer: ExpertServicer, health):
        self.server, self.port, self.servicer, self.health = server, port, servicer, health

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)


async def start_expert_server(config: ServiceConfig) -> ExpertServer:
    spec = config.topology.server(config.name)
    if not isinstance(spec, ExpertServerSpec):
        raise ValueError(f"{config.name!r} is a stage in the topology, not an expert server")
    reader = CheckpointReader(config.model_dir, device=config.device)
    log.info("%s: loading %d experts", config.name, len(spec.experts))
    shard = ExpertShard(config.model, spec.experts, reader, dtype=config.torch_dtype)
    reader.close()
    servicer = ExpertServicer(config.name, shard, config.torch_dtype)
    server = grpc_util.new_server()
    expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server)
    health = grpc_util.add_health_and_reflection(server, [SERVICE_NAME])
    port = grpc_util.bind(server, config.host, config.port)
    await server.start()
    address = f"{config.host}:{port}"
    await grpc_util.set_serving(health, [SERVICE_NAME], True)
    if config.router_address:
        await grpc_util.register_with_router(config.router_address, router_pb2.RegisterServerRequest(
            name=config.name, role=router_pb2.SERVER_ROLE_EXPERT, address=address,
            experts=[router_pb2.ExpertKey(layer=l, expert=e) for l, e in spec.experts],
            model_fingerprint=config.model.fingerprint))
    log.info("%s: expert server listening on %s", config.name, address)
    return ExpertServer(server, port, servicer, health)
