"""A tensor-parallel stage's links between its shard servers (transport side; the math is in
shardmesh.models.parallel, the group in shardmesh.tp_group).

The router sees one server per stage: rank 0, registered under the stage's name. Rank 0 fans every
request it gets out to the other shards ("stage-1/tp1", ...) over gRPC (stage_server/tp_fanout.py:
each Step on one long-lived Step stream per shard, FreeSequences and UpdatePlacement as unary
calls). All ranks then run the same steps in the same order and meet in
the row-parallel layers' AllReduce. Shards find each other through the group's rendezvous store:
each publishes its advertised address there once the group has formed.

The AllReduce is chosen per group once it has formed: rank 0 asks every other shard for its
host identity over the control plane (GetStageInfo.host_id); when all equal its own, the group
AllReduces through shared memory (shardmesh.shm_allreduce), else through gloo (shards on CUDA:
NCCL, always); the choice goes to the others through the store.

A group that does not form within the join timeout leaves the stage NOT_SERVING (health) and its
steps UNAVAILABLE with the reason; rank 0 then never registers with the router. A group that
breaks later (a shard killed, or frozen: its step stream fails keepalive within ~3 s; a collective
past its timeout) does the same: for good when the rendezvous was given on the command line; a
group whose rendezvous the router gives (stage_server/tp_rank.py, router/tp_ranks.py) re-forms in
a new generation instead (stage_server/tp_membership.py).
"""

import asyncio
import logging
from collections.abc import Callable

from shardmesh import codec
from shardmesh.errors import Unavailable
from shardmesh.shm_allreduce import ShmGroup, same_host
from shardmesh.tp_group import GlooGroup, NcclGroup, TPJoinError, TPStepFailed
from shardmesh.tp_stage import forward_off_loop, in_daemon_thread, join_group
from shardmesh.v1 import stage_pb2

from stage_server.tp_fanout import TPFanout

log = logging.getLogger(__name__)


class LazyGroup:
    """A TPGroup whose rank and size are known when the weights load and whose gloo group joins
    later (`join`). Until then, and for good once a collective has failed, all_reduce raises
    TPJoinError with the reason: a stage with a lost peer fails fast instead of waiting again."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.group: GlooGroup | ShmGroup | None = None
        self.backend = ""  # "shm" | "gloo" | "nccl" (shards on CUDA) once formed
        self.failure = "the tensor-parallel group has not formed yet"
        self.on_break: Callable[[str], None] | None = None  # called once, from any thread, when it breaks

    def all_reduce(self, tensor):
        group = self.group
        if group is None:
            raise TPJoinError(self.failure)
        try:
            return group.all_reduce(tensor)
        except TPJoinError as error:
            self.fail(f"the group broke: {error}")
            raise

    def fail(self, reason: str) -> None:
        """The group is lost for good (a peer died or timed out): later steps fail at once with
        `reason`; a rank waiting in a shared-memory collective stops waiting."""
        group, self.group = self.group, None
        if group is None:
            return
        self.failure = reason
        if isinstance(group, ShmGroup):
            group.abort(reason)
        if self.on_break is not None:
            self.on_break(reason)


SHM_CAPACITY = 1 << 20  # bytes per rank and bank: a decode step of 64 sequences at H = 4096 (fp32); more: gloo


async def join_stage_group(group: LazyGroup, stage_name: str, rendezvous: str, timeout_s: float,
                           advertised: str, security, host_id: str = "",
                           collective_timeout_s: float | None = None, device: str = "cpu",
                           store=None) -> TPFanout | None:
    """Form the group, exchange addresses, choose the AllReduce (shared memory when every shard
    advertises `host_id`, else gloo); on rank 0 returns the fan-out to the others. Raises
    TPJoinError (recorded in `group.failure`) when the group is not complete within `timeout_s`.
    `store`: rank 0's group store, already bound at `rendezvous` (stage_server/tp_rank.py)."""
    fanout = None
    try:
        joined = await join_group(group.rank, group.world_size, rendezvous, timeout_s, name=stage_name, store=store,
                                  collective_timeout_s=collective_timeout_s, device=device)  # CUDA: NCCL
        joined.store.set(f"{stage_name}/address/{group.rank}", advertised)
        choice_key = f"{stage_name}/all_reduce"
        if group.rank == 0:
            keys = [f"{stage_name}/address/{rank}" for rank in range(1, group.world_size)]
            addresses = await in_daemon_thread(lambda: [joined.store.get(key).decode() for key in keys])
            fanout = TPFanout(addresses, security)
            others = await fanout.host_ids()
            choice = "shm" if ShmGroup.supported() and same_host([host_id, *others]) else "gloo"
            choice = "nccl" if isinstance(joined, NcclGroup) else choice  # shards on CUDA: no host copies
            joined.store.set(choice_key, choice)
        else:
            choice = (await in_daemon_thread(joined.store.get, choice_key)).decode()
        chosen = joined if choice in ("gloo", "nccl") else await in_daemon_thread(
            ShmGroup.over, joined, SHM_CAPACITY, collective_timeout_s or timeout_s)
    except (TPJoinError, RuntimeError, OSError) as error:  # RuntimeError: the store lost a peer while exchanging
        if fanout is not None:
            await fanout.close()
        group.failure = f"stage {stage_name} rank {group.rank}: {error}"
        raise TPJoinError(group.failure) from error
    except asyncio.CancelledError:  # given up (stage_server/tp_membership.py): the group is never used
        if fanout is not None:
            await fanout.close()
        raise
    group.group, group.backend = chosen, choice
    log.info("%s rank %d/%d: tensor-parallel group formed at %s, AllReduce over %s", stage_name, group.rank,
             group.world_size, rendezvous, choice)
    return fanout


async def tp_step(fanout: TPFanout | None, request: stage_pb2.StepRequest, model, batch, experts):
    """One step of this shard's model; on rank 0 of a TP stage, the other shards run it too.
    Validated here first, so a bad request never reaches the other shards.

    Once the shards have the step, every rank must finish it or the ranks' collectives and KV
    caches diverge. An expert call that fails on one rank is agreed on by every rank at the MoE
    block's collective (models.parallel.moe_block): every rank raises TPStepFailed there, none keeps
    the step's KV, and the next step runs as usual. Any other failure on one rank (a shard died)
    breaks the group for good (LazyGroup.fail: NOT_SERVING, later steps UNAVAILABLE with the reason)."""
    model.validate(batch)
    if isinstance(model.tp, LazyGroup) and model.tp.group is None:  # not formed, or broken: fail at once
        raise Unavailable("tp", model.tp.failure)
    if fanout is None:
        try:
            if model.tp.world_size == 1:  # validated above with no await since: forward need not again
                return await model.forward(batch, experts, validated=True)
            return await forward_off_loop(model, batch, experts)
        except asyncio.CancelledError:  # a shard's steps come from rank 0 only: rank 0 gave up this one
            if model.tp.world_size > 1:
                model.tp.fail("rank 0 abandoned a step mid-way")
            raise
    # Re-encoded from the decoded batch: the request may have come over the shared-memory plane,
    # whose tensors live in a segment the other shards do not map.
    forwarded = stage_pb2.StepRequest(step_id=request.step_id, sequences=request.sequences,
                                      traceparent=request.traceparent)
    (forwarded.token_ids if model.is_first else forwarded.hidden_states).CopyFrom(codec.encode(batch.inputs, arena=None))
    try:
        await fanout.send_step(forwarded)
    except Unavailable as error:
        model.tp.fail(error.message)
        raise
    # The shards' replies are awaited alongside this rank's step: a shard that fails (its process
    # died) aborts this rank's shared-memory collective at once, not after the collective timeout.
    replies = asyncio.ensure_future(fanout.finish_step())
    step = asyncio.ensure_future(forward_off_loop(model, batch, experts))
    await asyncio.wait({replies, step}, return_when=asyncio.FIRST_COMPLETED)
    if (replies.done() and replies.exception() is not None and not step.done()
            and not isinstance(replies.exception(), TPStepFailed)):
        model.tp.fail(str(replies.exception()))  # a shard died or froze mid-step: the group is lost
        # Shared memory stops waiting at once; a gloo collective cannot be abandoned and holds this
        # rank's step thread until the collective timeout. Either way the step has failed: say so now.
        step.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise replies.exception()
    try:
        output = await step
    except TPStepFailed:  # every rank failed it at the same collective: no KV kept anywhere, the group stays
        try:
            await replies
        except TPStepFailed:
            pass
        except Unavailable as error:  # a shard failed otherwise (it died meanwhile): the group is lost
            model.tp.fail(error.message)
        raise
    except Exception as error:
        model.tp.fail(f"rank 0's step failed, the shards' did not wait for it: {error}")
        replies.cancel()
        await fanout.reset()  # the shards' steps are cancelled with their streams
        raise
    try:
        await replies
    except Unavailable as error:  # TPStepFailed too: this rank finished the step the shards failed
        model.tp.fail(error.message)
        raise
    return output
