"""What a tensor-parallel shard server needs around its StageModel, transport-free:

    group = await join_group(rank, world_size, rendezvous, timeout_s)   # TPJoinError, never a hang
    output = await forward_off_loop(model, batch, experts)              # the loop stays free

A collective blocks its thread until every rank arrives. Shard servers of one stage may share an
event loop (the in-process test mesh) and every server's loop must keep serving health checks
and other RPCs meanwhile, so a TP step runs in a worker thread with its own event loop; the
stage's ExpertBackend (bound to the server's loop, as grpc.aio channels are) is called back on
the server's loop (`LoopBridgeExperts`).
"""

import asyncio
import concurrent.futures
import functools
import threading

import torch

from shardmesh.errors import Unavailable
from shardmesh.stage_model import ExpertBackend, StageBatch, StageModel
from shardmesh.tp_group import GlooGroup, NcclGroup, TPJoinError, group_class


async def join_group(rank: int, world_size: int, rendezvous: str, timeout_s: float, name: str = "tp",
                     store=None, collective_timeout_s: float | None = None, device: str = "cpu") -> GlooGroup:
    """Form this rank's gloo group off the event loop. Raises TPJoinError (naming the rank, the
    rendezvous and the cause) when the group is not complete after `timeout_s` seconds (the join
    timeout); each collective then fails after `collective_timeout_s` (default `timeout_s`).
    Shards on CUDA form an NCCL group (tp_group.group_class), on the CPU a gloo group."""
    kind = group_class(device)
    on_device = {"device": device} if kind is NcclGroup else {}
    try:
        return await asyncio.wait_for(in_daemon_thread(functools.partial(
            kind, rank, world_size, rendezvous, timeout_s, name, store, collective_timeout_s, **on_device)),
            timeout_s + 5)
    except asyncio.TimeoutError:  # gloo's own timeout should have fired first; belt and braces
        raise TPJoinError(f"{name} rank {rank}/{world_size}: no group at {rendezvous} after {timeout_s} s") from None


def in_daemon_thread(function, *args) -> asyncio.Future:
    """`function(*args)` in a daemon thread of its own, awaited here. For the group's blocking calls
    (joining, store reads): one given up (cancelled, or its process stopping) runs out its own
    timeout unheeded, and neither asyncio.run nor the interpreter's exit waits for it, as they
    would for asyncio.to_thread's pool."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as caught:  # handed to the awaiting coroutine
            result, error = None, caught
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass
    threading.Thread(target=run, daemon=True, name="tp-group").start()
    return future


class LoopBridgeExperts:
    """An ExpertBackend usable from a worker thread's event loop: each call runs on `loop`."""

    def __init__(self, experts: ExpertBackend, loop: asyncio.AbstractEventLoop):
        self.experts, self.loop = experts, loop

    async def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        future = asyncio.run_coroutine_threadsafe(self.experts.run(layer, groups), self.loop)
        return await asyncio.wrap_future(future)


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="tp-step")


async def forward_off_loop(model: StageModel, batch: StageBatch, experts: ExpertBackend | None) -> torch.Tensor:
    """`model.forward(batch, experts)` in a worker thread (its own event loop), awaited here.
    Without TP (world size 1) it simply runs here. A failed collective (a peer lost or late) is
    Unavailable("tp", reason); the KV cache is then as before the step."""
    if model.tp.world_size == 1:
        return await model.forward(batch, experts)
    loop = asyncio.get_running_loop()
    bridged = LoopBridgeExperts(experts, loop) if experts is not None else None
    try:
        return await loop.run_in_executor(_pool, lambda: asyncio.run(model.forward(batch, bridged)))
    except TPJoinError as error:
        raise Unavailable("tp", str(error)) from None
