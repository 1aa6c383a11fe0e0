"""A whole mesh inside one asyncio event loop, every service a real grpc.aio server on loopback
(ports chosen by the OS), talking over the real wire. For tests and benchmarks: torch is
imported once and nothing is spawned. `shardmesh up` runs the same services as processes."""

import asyncio
import dataclasses
import pathlib

from shardmesh import grpc_util
from shardmesh.security import Security
from shardmesh.service_config import ServiceConfig
from shardmesh.topology import Topology


@dataclasses.dataclass
class LocalMesh:
    router: object
    stages: list
    experts: list

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.router.port}"

    async def stop(self) -> None:
        await self.router.stop(grace=None)
        for server in (*self.stages, *self.experts):
            await server.stop(grace=None)


async def start_local_mesh(model_dir: str | pathlib.Path, topology: Topology | None = None, *,
                           dtype: str = "", device: str = "cpu", devices: dict[str, str] | None = None,
                           max_context: int = 0, ready_timeout: float = 60.0, security: Security | None = None,
                           router_options: dict | None = None, data_plane: str = "shm") -> LocalMesh:
    """Start a router, then every stage and expert server of `topology` (default: the model's),
    and return once the router reports SERVING on grpc.health.v1.

    Every server runs on `device` ("cpu" or "cuda:N") unless `devices` (server name -> device)
    or else the topology's `device` for it (Topology.device_of) says otherwise; `dtype` "" is the default of `device` (bfloat16 on CUDA, float32 on CPU) and
    one dtype serves the whole mesh, whatever the devices (the wire checks activations' dtype).
    `security` (default: none) is every service's; `router_options` go to `start_router`;
    `data_plane` ("shm" | "grpc") is every service's (ServiceConfig.data_plane)."""
    from expert_server.main import start_expert_server
    from router.main import start_router
    from stage_server.main import start_stage_server

    base = ServiceConfig(model_dir=model_dir, topology=topology, dtype=dtype, device=device,
                         security=security or Security(), data_plane=data_plane)
    devices = dict(devices or {})
    unknown = set(devices) - {s.name for s in (*base.topology.stages, *base.topology.expert_servers)}
    if unknown:
        raise KeyError(f"devices names servers not in the topology: {sorted(unknown)}")
    router = await start_router(base, max_context=max_context, **(router_options or {}))
    address = f"127.0.0.1:{router.port}"
    mesh = LocalMesh(router, [], [])
    try:
        def config(name: str, server: str = "", **more) -> ServiceConfig:
            server = server or name  # a TP shard's own name, for its device
            return dataclasses.replace(base, name=name, router_address=address, topology=base.topology,
                                       device=devices.get(server) or base.topology.device_of(server) or base.device,
                                       **more)

        # A tensor-parallel stage's shards (tp > 1) get their ranks and rendezvous from the router
        # (router/tp_ranks.py), as `shardmesh up` starts them; listed in rank order below.
        shards = [config(s.name, shard, tp_auto_rank=True, tp_shard_id=shard) if s.tp > 1 else config(s.name)
                  for s in base.topology.stages for shard in s.shard_names()]
        started = await asyncio.gather(*(start_stage_server(c) for c in shards))
        order = [name for s in base.topology.stages for name in s.shard_names()]
        mesh.stages = sorted(started, key=lambda server: order.index(server.servicer.name))
        mesh.experts = list(await asyncio.gather(
            *(start_expert_server(config(e.name)) for e in base.topology.expert_servers)))
        await grpc_util.wait_for_health(address, ready_timeout, security=base.security)
    except BaseException:
        await mesh.stop()
        raise
    return mesh
