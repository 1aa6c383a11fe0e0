"""A shard of a tensor-parallel stage that learns its rank and its group's rendezvous from the
router (the router's half, and the protocol: router/tp_ranks.py).

    ranks = RouterRanks(config, spec, rank=None)        # None: --tp-rank auto
    rank = await ranks.ask_rank()                        # before loading: the rank picks the slice
    rendezvous, store = await ranks.rendezvous(advertised_host)   # once listening
    group = await join_stage_group(..., rendezvous, ..., store=store)

Rank 0 binds the group's store itself (a port the OS chooses) and gives its address to the
router; the others ask until the router has it. Every shard asks again every few seconds from
the moment it has a rank (its lease: a shard that stops asking loses its rank after a while).
Every wait is bounded by the join timeout: a rendezvous that never comes is a TPJoinError, and
the stage stays NOT_SERVING with that reason, as for a group that does not form.
"""

import asyncio
import logging

import grpc

from shardmesh import grpc_util
from shardmesh.registration import RouterRegistration
from shardmesh.service_config import ServiceConfig
from shardmesh.topology import StageSpec
from shardmesh.tp_group import GlooGroup, TPJoinError
from shardmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class RouterRanks:
    def __init__(self, config: ServiceConfig, spec: StageSpec, rank: int | None):
        self.config, self.spec = config, spec
        self.rank = rank                 # None until the router assigns one (--tp-rank auto)
        self.given_rendezvous = ""       # rank 0: host:port of the store it bound, once bound
        self.heartbeat: RouterRegistration | None = None

    def request(self, starting: bool = False) -> router_pb2.RegisterServerRequest:
        shard = router_pb2.TensorParallelShard(shard_id=self.config.tp_shard_id, rendezvous=self.given_rendezvous,
                                               starting=starting)
        if self.rank is not None:
            shard.rank = self.rank
        return router_pb2.RegisterServerRequest(
            name=self.spec.name, role=router_pb2.SERVER_ROLE_STAGE, model_fingerprint=self.config.model.fingerprint,
            layers=router_pb2.LayerRange(start=self.spec.start_layer, end=self.spec.end_layer), tp_shard=shard)

    async def ask_rank(self) -> int:
        """This shard's rank (the router's, or the one it was named with, confirmed); then keeps asking
        every few seconds in the background. TimeoutError (the router unreachable, or every rank held by
        a live shard) after the join timeout; a refusal is raised as the router's AioRpcError."""
        reply = await grpc_util.register_with_router(self.config.router_address, self.request(starting=True),
                                                     self.config.tp_join_timeout, self.config.security)
        if reply.tp.world_size != self.spec.tp:
            raise ValueError(f"the router says stage {self.spec.name!r} has tp {reply.tp.world_size}, "
                             f"this shard's topology says {self.spec.tp}")
        self.rank = reply.tp.rank
        log.info("%s: the router gave this shard (%s) rank %d of %d", self.spec.name, self.config.tp_shard_id,
                 self.rank, self.spec.tp)
        self.heartbeat = RouterRegistration(self.config.router_address, self.request, self.config.security,
                                            self.config.reregister_interval_s).start()
        return self.rank

    async def rendezvous(self, advertised_host: str) -> tuple[str, object | None]:
        """(host:port where the group meets, the store rank 0 bound there or None). TPJoinError when
        the router has not had it from rank 0 within the join timeout."""
        timeout_s = self.config.tp_join_timeout
        if self.rank == 0:
            try:
                store = await asyncio.to_thread(GlooGroup.host_store, self.config.host, self.spec.tp, timeout_s)
            except RuntimeError as error:
                raise TPJoinError(f"stage {self.spec.name} rank 0: cannot bind the group's store on "
                                  f"{self.config.host}: {error}") from error
            self.given_rendezvous = f"{advertised_host}:{store.port}"
            try:
                await grpc_util.register_with_router(self.config.router_address, self.request(), timeout_s,
                                                     self.config.security)
            except (TimeoutError, grpc.aio.AioRpcError) as error:
                raise TPJoinError(f"stage {self.spec.name} rank 0: could not give the router the rendezvous: "
                                  f"{_why(error)}") from error
            return self.given_rendezvous, store
        async with grpc_util.open_channel(self.config.router_address, self.config.security) as channel:
            stub = router_pb2_grpc.RegistryStub(channel)

            async def ask(remaining: float) -> str | None:
                reply = await stub.RegisterServer(self.request(), timeout=min(remaining, grpc_util.CONTROL_DEADLINE_S))
                return reply.tp.rendezvous or None

            def late(error) -> TPJoinError:
                last = f" (last: {error.details()})" if error is not None else ""
                return TPJoinError(f"stage {self.spec.name} rank {self.rank}: the router gave no rendezvous within "
                                   f"{timeout_s} s: rank 0 has not given it (not started, or still loading){last}")
            try:
                return await grpc_util.retry_until(ask, timeout_s, 0.05, 0.5, late,
                                                   peer=f"router at {self.config.router_address}"), None
            except grpc.aio.AioRpcError as error:
                raise TPJoinError(f"stage {self.spec.name} rank {self.rank}: the router refused: {_why(error)}") from error

    async def stop(self) -> None:
        if self.heartbeat is not None:
            await self.heartbeat.stop()


def _why(error: BaseException) -> str:
    return f"{error.code().name} {error.details()}" if isinstance(error, grpc.aio.AioRpcError) else str(error)
