"""TPRanks: the router's half of forming tensor-parallel groups through the control plane.

A shard of a tensor-parallel stage started without a rendezvous (`--tp-rank auto`, or a shard
named by rank, "stage-1/tp1", without `--tp-rendezvous`) asks the router with a RegisterServer
carrying `tp_shard` (router.proto, TensorParallelShard):

    1. before loading its weights (`starting`): "which rank am I?" -> rank r of T (which slice to load)
    2. once listening: rank 0 gives the rendezvous (host:port of the group store it has bound);
       the others ask until the reply carries it, then join the group there
    3. every few seconds after that (keeps the rank; a router that restarted adopts the claimed rank)

The same shard_id always gets the same rank back. A rank whose shard has not asked for
`lease_s` (it died) may go to another shard_id; until then a new shard_id finding every rank
held gets UNAVAILABLE (retried by the shard until its join timeout). Rank 0 then registers the
stage itself, as any stage does, once its group has formed: the stage is served only then.
"""

import dataclasses
import time

from shardmesh.config import ModelConfig
from shardmesh.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shardmesh.topology import Topology
from shardmesh.tp_group import parse_rendezvous
from shardmesh.v1 import router_pb2

LEASE_S = 30.0  # a shard asks every 5 s (shardmesh.registration); 6 misses in a row: it is gone
MAX_SHARD_ID_CHARS = 253  # a DNS name's length: room for any host name or pod name


@dataclasses.dataclass
class Holder:
    shard_id: str
    heard: float  # clock() when it last asked


class TPRanks:
    def __init__(self, topology: Topology, config: ModelConfig, lease_s: float = LEASE_S, clock=time.monotonic):
        self.config, self.lease_s, self.clock = config, lease_s, clock
        self.stages = {spec.name: spec for spec in topology.stages}
        self.holders: dict[str, dict[int, Holder]] = {spec.name: {} for spec in topology.stages if spec.tp > 1}
        self.rendezvous: dict[str, str] = {}  # stage -> rank 0's group store, host:port

    def answer(self, request: router_pb2.RegisterServerRequest) -> router_pb2.RegisterServerResponse:
        """A RegisterServer with tp_shard: check it, assign (or confirm) the rank; raises naming the field."""
        spec = self.stages.get(request.name)
        if spec is None:
            raise NotFound("name", f"{request.name!r} is not a stage of the topology (has {sorted(self.stages)})")
        if request.name not in self.holders:
            raise FailedPrecondition("tp_shard", f"stage {spec.name!r} is not tensor-parallel (tp = 1 in the topology)")
        if request.role != router_pb2.SERVER_ROLE_STAGE:
            raise FailedPrecondition("role", f"{spec.name!r} is a stage in the topology")
        if request.model_fingerprint != self.config.fingerprint:
            raise FailedPrecondition("model_fingerprint", f"{request.model_fingerprint!r} differs from the router's "
                                     f"{self.config.fingerprint!r}: servers must load the same checkpoint")
        if (request.layers.start, request.layers.end) != (spec.start_layer, spec.end_layer):
            raise FailedPrecondition("layers", f"{spec.name!r} holds [{spec.start_layer}, {spec.end_layer}) in the "
                                     f"topology, not [{request.layers.start}, {request.layers.end})")
        shard = request.tp_shard
        if not 0 < len(shard.shard_id) <= MAX_SHARD_ID_CHARS or not shard.shard_id.isprintable():
            raise InvalidArgument("tp_shard.shard_id", f"must be 1-{MAX_SHARD_ID_CHARS} printable characters")
        claimed = shard.rank if shard.HasField("rank") else None
        if claimed is not None and claimed >= spec.tp:
            raise InvalidArgument("tp_shard.rank", f"{claimed} is not in [0, {spec.tp}) (the stage's tp)")
        if shard.rendezvous:
            try:
                parse_rendezvous(shard.rendezvous)
            except ValueError as error:
                raise InvalidArgument("tp_shard.rendezvous", str(error)) from None
        rank = self._assign(spec.name, spec.tp, shard.shard_id, claimed)
        if shard.rendezvous and rank != 0:
            raise FailedPrecondition("tp_shard.rendezvous", f"only rank 0 gives the rendezvous; "
                                     f"{shard.shard_id!r} holds rank {rank}")
        if rank == 0 and (shard.rendezvous or shard.starting):  # starting (again): its old store is gone
            self.rendezvous[spec.name] = shard.rendezvous
        self.holders[spec.name][rank] = Holder(shard.shard_id, self.clock())
        return router_pb2.RegisterServerResponse(tp=router_pb2.TensorParallelAssignment(
            rank=rank, world_size=spec.tp, rendezvous=self.rendezvous.get(spec.name, "")))

    def _assign(self, stage: str, size: int, shard_id: str, claimed: int | None) -> int:
        holders, now = self.holders[stage], self.clock()
        held = next((r for r, h in holders.items() if h.shard_id == shard_id), None)
        if held is not None:
            if claimed is not None and claimed != held:
                raise FailedPrecondition("tp_shard.rank", f"{shard_id!r} holds rank {held} of {stage!r}, not {claimed}")
            return held
        live = {r for r, h in holders.items() if now - h.heard < self.lease_s}
        if claimed is not None:  # named by rank on its command line, or a router that restarted
            if claimed in live:
                raise FailedPrecondition("tp_shard.rank", f"rank {claimed} of {stage!r} is held by "
                                         f"{holders[claimed].shard_id!r}, which asked {now - holders[claimed].heard:.0f} s ago")
            rank = claimed
        else:
            free = [r for r in range(size) if r not in live]
            if not free:
                ids = ", ".join(f"{holders[r].shard_id!r} (rank {r})" for r in sorted(holders))
                raise Unavailable("tp_shard", f"every rank of {stage!r} is held by a live shard: {ids}; a rank "
                                  f"whose shard stops asking for {self.lease_s:.0f} s is given again")
            rank = free[0]
        return rank

    def shards(self, stage: str) -> list[router_pb2.TensorParallelShardStatus]:
        """GetClusterStatus: the ranks of `stage` assigned here, in rank order (empty when none)."""
        now = self.clock()
        return [router_pb2.TensorParallelShardStatus(rank=r, shard_id=h.shard_id, seconds_since_heard=now - h.heard)
                for r, h in sorted(self.holders.get(stage, {}).items())]
