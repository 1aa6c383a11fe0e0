"""A shard of a tensor-parallel stage that learns its rank and its group's rendezvous from the
router (the router's half, and the protocol: router/tp_ranks.py).

    ranks = RouterRanks(config, spec, rank=None)        # None: --tp-rank auto
    rank = await ranks.ask_rank()                        # before loading: the rank picks the slice
    generation, rendezvous, store = await ranks.rendezvous(advertised_host, after=0)   # once listening
    group = await join_stage_group(..., rendezvous, ..., store=store)

Rank 0 binds the group's store itself (a port the OS chooses) and gives its address to the
router; the others ask until the router has it. Every shard asks again every few seconds from
the moment it has a rank (its lease: a shard that stops asking loses its rank after a while).
The first wait is bounded by the join timeout: a rendezvous that never comes is a TPJoinError, and
the stage stays NOT_SERVING with that reason, as for a group that does not form.

Each rendezvous is for one group generation (router/tp_ranks.py): `rendezvous(after=g)` waits for
one of a generation after g (the shard left g); rank 0 opens a new store for it. The shard's asks
carry the generation it is in and, once its group broke, `group_lost`; every reply goes to
`on_reply` (stage_server/tp_membership.py: a newer generation makes the shard leave its group).
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
ASK_INTERVAL_S = 1.0  # a shard asks at least this often: it sees a new generation within a second


class RouterRanks:
    def __init__(self, config: ServiceConfig, spec: StageSpec, rank: int | None):
        self.config, self.spec = config, spec
        self.rank = rank                 # None until the router assigns one (--tp-rank auto)
        self.given_rendezvous = ""       # rank 0: host:port of the store it bound, once bound
        self._store = None               # rank 0: that store, for `generation`, until its group takes it
        self.heartbeat: RouterRegistration | None = None
        # Rank 0's given_rendezvous is for this generation; every shard says it in each ask.
        self.generation = 0              # the group generation this shard is in or joining (0: none yet)
        self.group_lost = False          # its group of `generation` broke: the router starts another
        self.on_reply = None             # called with the TensorParallelAssignment of every heartbeat's reply

    def request(self, starting: bool = False) -> router_pb2.RegisterServerRequest:
        shard = router_pb2.TensorParallelShard(shard_id=self.config.tp_shard_id, rendezvous=self.given_rendezvous,
                                               starting=starting, generation=self.generation,
                                               group_lost=self.group_lost)
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
                                            min(self.config.reregister_interval_s, ASK_INTERVAL_S),
                                            on_reply=self._heard).start()
        return self.rank

    async def _heard(self, reply: router_pb2.RegisterServerResponse) -> bool:
        if self.on_reply is not None:
            self.on_reply(reply.tp)
        return False  # nothing to register again at once

    async def rendezvous(self, advertised_host: str, after: int = 0,
                         timeout_s: float | None = None) -> tuple[int, str, object | None]:
        """(generation, host:port where its group meets, the store rank 0 bound there or None), for a
        generation after `after`. TPJoinError when the router has not had it from rank 0 within
        `timeout_s` (None: wait as long as it takes; every ask keeps this shard's rank)."""
        name = f"stage {self.spec.name} rank {self.rank}"
        limit = self.config.tp_join_timeout if timeout_s is None else timeout_s
        async with grpc_util.open_channel(self.config.router_address, self.config.security) as channel:
            stub = router_pb2_grpc.RegistryStub(channel)

            async def ask(remaining: float):
                reply = (await stub.RegisterServer(self.request(), timeout=min(remaining, grpc_util.CONTROL_DEADLINE_S))).tp
                if self.rank != 0:
                    return (reply.generation, reply.rendezvous, None) if reply.rendezvous and reply.generation > after else None
                generation = max(reply.generation, after + 1)  # > reply's: a router that restarted adopts it
                if self._store is None or self.generation != generation:  # a store for `generation`, given with it
                    self._store, self.given_rendezvous = None, ""
                    try:
                        self._store = await asyncio.to_thread(GlooGroup.host_store, self.config.host, self.spec.tp, limit)
                    except RuntimeError as error:
                        raise TPJoinError(f"{name}: cannot bind the group's store on {self.config.host}: {error}") from error
                    self.given_rendezvous = f"{advertised_host}:{self._store.port}"
                    self.generation, self.group_lost = generation, False
                    reply = (await stub.RegisterServer(self.request(), timeout=grpc_util.CONTROL_DEADLINE_S)).tp
                if reply.rendezvous == self.given_rendezvous and reply.generation == generation:
                    return generation, self.given_rendezvous, self._store
                return None  # not recorded (yet): ask again; a newer generation gets a new store

            def late(error) -> TPJoinError:
                last = f" (last: {error.details()})" if error is not None else ""
                if self.rank == 0:
                    return TPJoinError(f"{name}: could not give the router the rendezvous within {limit} s{last}")
                return TPJoinError(f"{name}: the router gave no rendezvous within {limit} s: rank 0 has not "
                                   f"given it (not started, or still loading){last}")
            while True:
                try:
                    found = await grpc_util.retry_until(ask, limit, 0.05, 0.5, late,
                                                        peer=f"router at {self.config.router_address}")
                except grpc.aio.AioRpcError as error:
                    raise TPJoinError(f"{name}: the router refused: {_why(error)}") from error
                except TPJoinError:
                    if timeout_s is not None:
                        raise
                    continue  # no bound: ask on
                self._store = None  # the group owns it now (rank 0)
                self.generation, self.group_lost = found[0], False  # joining it
                return found


    async def stop(self) -> None:
        if self.heartbeat is not None:
            await self.heartbeat.stop()


def _why(error: BaseException) -> str:
    return f"{error.code().name} {error.details()}" if isinstance(error, grpc.aio.AioRpcError) else str(error)
