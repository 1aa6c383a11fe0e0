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

Generations: a torch.distributed group cannot take back a rank whose process restarted, so the
table numbers the stage's groups (from 1). A new generation starts when a rank that took part in
the current one asks `starting` (its process restarted, or another shard took its rank after the
lease) or when a shard of the current one reports it lost (`group_lost`: a peer died or froze).
The rendezvous is then cleared; every shard sees the new number in its next reply (they ask every
second), leaves its group (its KV caches are lost) and waits for rank 0, which opens a new store
and gives its address for that generation; a store given for an older one is ignored.
"""

import dataclasses
import logging
import time

from shardmesh.config import ModelConfig
from shardmesh.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shardmesh.topology import Topology
from shardmesh.tp_group import parse_rendezvous
from shardmesh.v1 import router_pb2

log = logging.getLogger(__name__)
LEASE_S = 30.0  # a shard asks every 5 s (shardmesh.registration); 6 misses in a row: it is gone
MAX_SHARD_ID_CHARS = 253  # a DNS name's length: room for any host name or pod name


@dataclasses.dataclass
class Holder:
    shard_id: str
    heard: float     # clock() when it last asked
    generation: int  # the group generation it last said it is in (0: none yet)


class TPRanks:
    def __init__(self, topology: Topology, config: ModelConfig, lease_s: float = LEASE_S, clock=time.monotonic):
        self.config, self.lease_s, self.clock = config, lease_s, clock
        self.stages = {spec.name: spec for spec in topology.stages}
        self.holders: dict[str, dict[int, Holder]] = {spec.name: {} for spec in topology.stages if spec.tp > 1}
        self.rendezvous: dict[str, str] = {}  # stage -> rank 0's group store for `generation`, host:port
        self.generation: dict[str, int] = {name: 1 for name in self.holders}  # stage -> its current group

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
        if shard.generation >= 2**62:
            raise InvalidArgument("tp_shard.generation", f"{shard.generation} is not below 2**62")
        rank = self._assign(spec.name, spec.tp, shard.shard_id, claimed)
        if shard.rendezvous and rank != 0:
            raise FailedPrecondition("tp_shard.rendezvous", f"only rank 0 gives the rendezvous; "
                                     f"{shard.shard_id!r} holds rank {rank}")
        name, prior = spec.name, self.holders[spec.name].get(rank)
        if shard.generation > self.generation[name]:  # a router that restarted: its shards say where they are
            self.generation[name] = shard.generation
            self.rendezvous.pop(name, None)
        current = self.generation[name]
        if shard.group_lost and shard.generation == current:
            self._new_generation(name, f"{shard.shard_id!r} (rank {rank}) lost its group")
        elif shard.starting and prior is not None and prior.generation == current and self.rendezvous.get(name):
            self._new_generation(name, f"rank {rank} started again ({shard.shard_id!r}; it was "
                                       f"{prior.shard_id!r}, in generation {current})")
        elif rank == 0 and shard.starting:  # starting (again) before its group formed: its old store is gone
            self.rendezvous.pop(name, None)
        if rank == 0 and shard.rendezvous and shard.generation in (0, self.generation[name]):  # 0: the current
            self.rendezvous[name] = shard.rendezvous
        given = self.rendezvous.get(name, "")
        # A shard handed the rendezvous takes part in the generation (it joins now): should it
        # start again, even before it said so in an ask, the group must re-form.
        in_generation = self.generation[name] if given and rank != 0 else shard.generation
        self.holders[name][rank] = Holder(shard.shard_id, self.clock(), 0 if shard.starting else in_generation)
        return router_pb2.RegisterServerResponse(tp=router_pb2.TensorParallelAssignment(
            rank=rank, world_size=spec.tp, rendezvous=given, generation=self.generation[name]))

    def _new_generation(self, stage: str, why: str) -> None:
        self.generation[stage] += 1
        self.rendezvous.pop(stage, None)
        log.warning("stage %s: tensor-parallel group generation %d starts: %s", stage, self.generation[stage], why)

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

    def all_heard(self, stage: str, within_s: float) -> bool:
        """Whether every rank of `stage` (a TP stage whose shards ask here) is held by a shard that
        asked within `within_s`: its group can re-form (router/failover.py waits for it)."""
        holders, now = self.holders.get(stage, {}), self.clock()
        size = self.stages[stage].tp if stage in self.stages else 0
        return size > 1 and all(r in holders and now - holders[r].heard < within_s for r in range(size))

    def shards(self, stage: str) -> list[router_pb2.TensorParallelShardStatus]:
        """GetClusterStatus: the ranks of `stage` assigned here, in rank order (empty when none)."""
        now = self.clock()
        return [router_pb2.TensorParallelShardStatus(rank=r, shard_id=h.shard_id, seconds_since_heard=now - h.heard,
                                                     generation=h.generation)
                for r, h in sorted(self.holders.get(stage, {}).items())]
