"""GroupMembership: keeps an auto-ranked shard (stage_server/tp_rank.py) in its stage's current
tensor-parallel group, re-forming it when the group breaks or the router starts a new generation
(the router's half: router/tp_ranks.py).

    membership = GroupMembership(ranks, group, servicer, running, name, config, services)
    await membership.start()    # returns after the first attempt (formed, or NOT_SERVING with why)

A torch.distributed group cannot take back a rank whose process restarted. So when a peer is lost
(this shard's group breaks: LazyGroup.on_break) or the router's reply names a newer generation (a
peer restarted, or another shard saw the group break), the shard leaves its group: NOT_SERVING
with the reason, the group dropped (shared memory aborted), rank 0's fan-out closed, the KV caches
of every sequence freed (they are lost: the router replays what it still needs). It then waits
for the next generation's rendezvous (rank 0 opens a new store), joins it and serves again; rank 0
then pushes its expert placement to the others and registers the stage with the router at once.

Time to serve again, once every rank's process is up: at most ASK_INTERVAL_S (1 s) for every shard
to hear of the generation, a rendezvous ask (0.05-0.5 s backoff), the join (store + gloo connect:
well under a second idle), and rank 0's registration. A join that fails (a peer not there within
the join timeout) reports that generation lost and tries the next: never a hang, never a loop
faster than the join timeout.
"""

import asyncio
import logging

from shardmesh import grpc_util
from shardmesh.errors import Unavailable
from shardmesh.tp_group import TPJoinError

from stage_server.tp_link import LazyGroup, join_stage_group
from stage_server.tp_rank import RouterRanks

log = logging.getLogger(__name__)


class GroupMembership:
    def __init__(self, ranks: RouterRanks, group: LazyGroup, servicer, running: grpc_util.RunningServer,
                 config, services: list[str], on_reformed=None):
        self.ranks, self.group, self.servicer, self.running = ranks, group, servicer, running
        self.config, self.services = config, services
        self.on_reformed = on_reformed  # async () -> None, after each re-form (rank 0: register with the router)
        self.formed = 0      # the generation of the group in use (0: none)
        self.current = 0     # the generation being joined or in use (0: waiting for a rendezvous)
        self.left = 0        # the last generation this shard left or failed to join
        self.reforms = 0     # groups formed after the first
        self._changed = asyncio.Event()  # the group broke, or a newer generation started
        self._first = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._health: asyncio.Task | None = None  # NOT_SERVING after a break (held: tasks are weakly referenced)
        self._loop = asyncio.get_running_loop()
        group.on_break = self._on_break
        ranks.on_reply = self._on_reply

    async def start(self) -> None:
        """Form the first group (bounded by the join timeout); then keep it in the background."""
        self._task = asyncio.create_task(self._keep())
        self.running.on_stop_first(self.stop)
        await self._first.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _on_break(self, reason: str) -> None:  # any thread
        if self.formed:  # not this shard leaving on its own (_leave)
            log.error("%s: tensor-parallel group lost, re-forming: %s", self.servicer.name, reason)
        self._loop.call_soon_threadsafe(self._broken, reason)

    def _broken(self, reason: str) -> None:
        """NOT_SERVING at once (before the step's failure reaches the router, whose probe must not
        find the stage SERVING), then leave the group (_round)."""
        self.servicer.not_serving_reason = reason
        self._health = self._loop.create_task(grpc_util.set_serving(self.running.health, self.services, False))
        self._changed.set()

    def _on_reply(self, reply) -> None:  # a heartbeat's TensorParallelAssignment
        if self.current and reply.generation > self.current:
            self._changed.set()

    async def _keep(self) -> None:
        first = True
        while True:
            try:
                await self._round(first)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die: the next round tries again
                log.exception("%s: keeping the tensor-parallel group failed", self.servicer.name)
                self._first.set()
                await asyncio.sleep(1.0)
            first = False

    async def _round(self, first: bool) -> None:
        """Join a generation, serve until it breaks or a newer one starts, leave it. The `first`
        round's wait for a rendezvous is bounded by the join timeout, later ones are not."""
        host = self.config.advertised(self.running.port).rpartition(":")[0]
        try:
            generation, rendezvous, store = await self.ranks.rendezvous(
                host, after=self.left, timeout_s=self.config.tp_join_timeout if first else None)
            self.current = generation
            self._changed.clear()
            fanout = await self._join(generation, rendezvous, store)
        except TPJoinError as error:  # NOT_SERVING with why; the next generation is tried
            log.error("%s: %s", self.servicer.name, error)
            self.servicer.not_serving_reason = str(error)
            superseded = self._changed.is_set()
            if self.ranks.generation > self.left:  # it had a rendezvous: that generation failed
                self.left, self.ranks.group_lost = self.ranks.generation, not superseded
            self.current = 0
            self._first.set()
            if not superseded:
                await asyncio.sleep(1.0)  # a join that fails at once (a peer unreachable) is not retried in a loop
            return
        self.formed = generation
        self.servicer.tp_fanout = fanout
        placement = getattr(self.servicer, "last_placement", None)
        if fanout is not None and placement is not None:  # restarted shards have none yet
            try:
                await fanout.update_placement(placement)
            except Unavailable as error:  # a shard failed it: this generation is no good
                self.group.fail(f"giving the shards the expert placement failed: {error.message}")
        if self.group.group is not None:
            self.servicer.not_serving_reason = ""
            await grpc_util.set_serving(self.running.health, self.services, True)
        if not first:
            self.reforms += 1
            log.warning("%s: tensor-parallel group re-formed (generation %d), SERVING", self.servicer.name,
                        generation)
            if self.on_reformed is not None:
                await self.on_reformed()
        self._first.set()
        await self._changed.wait()
        await self._leave()

    async def _join(self, generation: int, rendezvous: str, store):
        """join_stage_group, given up (TPJoinError) as soon as the router starts a newer generation
        (a peer restarted while this one formed): the join's thread runs out its timeout unheeded."""
        join = asyncio.ensure_future(join_stage_group(
            self.group, self.ranks.spec.name, rendezvous, self.config.tp_join_timeout,
            self.config.advertised(self.running.port), self.config.security, self.servicer.host_id,
            self.config.tp_collective_timeout, device=self.config.device, store=store))
        newer = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({join, newer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            newer.cancel()
            if not join.done():
                join.cancel()
        if join.cancelled() or not join.done():
            await asyncio.gather(join, return_exceptions=True)
            raise TPJoinError(f"stage {self.ranks.spec.name} rank {self.group.rank}: generation {generation} "
                              f"was superseded by a newer one before it formed")
        return join.result()

    async def _leave(self) -> None:
        """Drop the group of generation `formed` and every sequence's KV cache (they are lost)."""
        generation, self.formed, self.current = self.formed, 0, 0
        newer = self.group.group is not None  # not broken: a peer restarted (the router said so)
        reason = (f"the tensor-parallel group of generation {generation} is re-forming: "
                  + ("a peer restarted" if newer else self.group.failure))
        self.group.fail(reason)
        self.servicer.not_serving_reason = reason
        await grpc_util.set_serving(self.running.health, self.services, False)
        self.left = generation
        self.ranks.group_lost = not newer  # the router starts a new generation (if no one else had)
        fanout, self.servicer.tp_fanout = self.servicer.tp_fanout, None
        if fanout is not None:
            await fanout.close()
        model = self.servicer.model
        cached = model.cached_sequence_ids()
        self.servicer.history.freed(cached)
        model.free(cached)
        log.warning("%s: left tensor-parallel group generation %d (%s); freed %d sequences' KV caches",
                    self.servicer.name, generation, reason, len(cached))
