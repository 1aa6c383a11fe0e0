"""StagePipeline: runs batch steps through every stage over long-lived Step streams.

Hidden states travel from one stage's response into the next stage's request as they came
(bytes are not decoded at the router); only the last stage's logits are decoded. Several steps
(micro-batches) may be in flight at once: each link writes them on its stream in call order and a
reader task hands the responses, which come back in the same order, to their callers.

A stage that stops answering (its stream breaks, a step passes its deadline) raises `StageLost`;
the pipeline hands it to `on_stage_lost` (router/failover.py), which may switch the position to
a standby (`connect` with its address: a new `epoch`, and the scheduler replays every running
sequence) or mark the pipeline `broken` (no server left for those layers: every step fails
UNAVAILABLE at once)."""

import asyncio
import contextlib
import itertools
import logging
import time

import torch

from shardmesh import codec
from shardmesh.data_planes import DataPlanes
from shardmesh.errors import Unavailable
from shardmesh.sampling import GreedyTokens
from shardmesh.sequence import KVLost, SequenceSlice
from shardmesh.step_refusals import SequencesRefused, refusal_error
from shardmesh.telemetry import metrics, tracing

from router.stage_link import DEFAULT_STEP_TIMEOUT_S, StageLink, StageLost  # noqa: F401 (DEFAULT_...: re-exported)

log = logging.getLogger(__name__)
# A step's deadline at each stage scales with its work: a base (the router's --step-timeout) plus
# this per token of the step. Past it the stage is taken for frozen (probed, then dropped).
STEP_SECONDS_PER_TOKEN = 0.05


_UNTRACED = contextlib.nullcontext()
_BATCH_SERIES: tuple = ()  # the router's BATCH_SEQUENCES and BATCH_TOKENS series, labelled at the first step


def _observe_batch(sequences: int, tokens: int) -> None:
    global _BATCH_SERIES
    if not _BATCH_SERIES:  # (labels() takes a lock and hashes: once, not every step)
        _BATCH_SERIES = (metrics.BATCH_SEQUENCES.labels("router"), metrics.BATCH_TOKENS.labels("router"))
    _BATCH_SERIES[0].observe(sequences)
    _BATCH_SERIES[1].observe(tokens)


def _record_call(stage: str, seconds: float, sent, received) -> None:
    """metrics.data_plane_call of one stage's part of a step that took `seconds`, run at the loop's
    next turn: after the next step is written (the whole mesh waits for that write, not for this)."""
    received_bytes = 8 * len(received.token_ids) if isinstance(received, GreedyTokens) else metrics.tensor_bytes(received)
    metrics.data_plane_call("router", "router_stage", stage, time.perf_counter() - seconds,
                            metrics.tensor_bytes(sent), received_bytes)


class StagePipeline:
    def __init__(self, security=None, data_plane: str = "grpc", step_timeout: float = DEFAULT_STEP_TIMEOUT_S):
        self.security = security  # shardmesh.security.Security of the router's outgoing channels
        self.data_planes = DataPlanes(enabled=data_plane == "shm")
        self.links: list[StageLink] = []
        self._step_ids = itertools.count(1)
        self.step_timeout = step_timeout  # s per step at each stage, plus STEP_SECONDS_PER_TOKEN per token
        self.epoch = 0     # +1 whenever a stage position gets another server: KV caches there are gone
        self.broken = ""   # why no step can go through (a stage has no server), "" = it can
        # async (link, StageLost, epoch) -> None: decides whether the stage is gone (router/failover.py)
        self.on_stage_lost = None

    def _new_link(self, name: str, address: str) -> StageLink:
        link = StageLink(name, address, self.security, self.data_planes)
        link.on_idle_loss = lambda lost_link, error: self._lost(lost_link, error, self.epoch)
        return link

    async def _lost(self, link: StageLink, error: StageLost, epoch: int) -> None:
        if self.on_stage_lost is not None:
            await self.on_stage_lost(link, error, epoch)

    async def connect(self, stages: list[tuple[str, str]]) -> None:
        """(name, address) of each stage in order; reopens links whose address changed."""
        before = {link.address for link in self.links}
        old = {link.name: link for link in self.links}
        links = []
        for name, address in stages:
            link = old.pop(name, None)
            if link is None or link.address != address:
                if link is not None:
                    await link.close()
                    self.epoch += 1  # a restarted or other server: it has none of the KV caches
                link = self._new_link(name, address)
                await link.reset()
            links.append(link)
        for link in old.values():
            await link.close()
            self.epoch += 1
        self.links = links
        await self.data_planes.forget(before - {link.address for link in links})

    async def step(self, slices: list[SequenceSlice], token_ids: torch.Tensor,
                   greedy: bool = False) -> torch.Tensor | GreedyTokens:
        step_id = next(self._step_ids)
        sequences = slices  # of those still in the step (the links make the wire's SequenceSlices)
        payload, field = token_ids, "token_ids"
        epoch, links = self.epoch, self.links
        deadline = self.step_timeout + STEP_SECONDS_PER_TOKEN * token_ids.shape[0]
        live, refused = list(range(len(slices))), {}  # slices still in the step; index -> its RequestError
        loop = asyncio.get_running_loop()
        loop.call_soon(_observe_batch, len(slices), token_ids.shape[0])  # (once the step is sent)
        with tracing.router_step([s.sequence_id for s in slices]) if tracing.enabled() else _UNTRACED:
            for link in links:
                self._check(epoch)
                started, sent = time.perf_counter(), payload
                try:
                    payload, refusals = await link.forward(step_id, sequences, field, payload, deadline, greedy)
                except StageLost as error:
                    await self._lost(link, error, epoch)
                    self._check(epoch)  # replaced: KVLost; no server left: why
                    raise
                if refusals:  # shardmesh/step_refusals.py: these leave the step, the others go on
                    live, sequences = self._refused(link, refusals, live, sequences, refused)
                    if not live:
                        raise SequencesRefused(refused, None)
                loop.call_soon(_record_call, link.name, time.perf_counter() - started, sent, payload)
                field = "hidden_states"
        if isinstance(payload, GreedyTokens) and len(payload.token_ids) != len(sequences):
            raise Unavailable("stage", f"stage {links[-1].name} answered {len(payload.token_ids)} greedy token ids "
                                       f"for a step of {len(sequences)} sequences")
        if refused:
            raise SequencesRefused(refused, payload if isinstance(payload, (torch.Tensor, GreedyTokens))
                                   else codec.decode(payload, "logits", segment=None))  # [B', V]
        if isinstance(payload, (torch.Tensor, GreedyTokens)):
            return payload  # [B, V] or [B] token ids
        return codec.decode(payload, "logits", segment=None)  # [B, V]

    @staticmethod
    def _refused(link: StageLink, refusals: list, live: list[int], sequences: list, refused: dict):
        """Record `link`'s refusals (indices into `sequences`) in `refused` (by index into the step's
        slices); return the live indices and sequences left."""
        out = {r.index for r in refusals}
        if len(out) != len(refusals) or max(out) >= len(sequences):
            raise Unavailable("stage", f"stage {link.name} ({link.address}) refused sequences "
                                       f"{sorted(out)} of a step of {len(sequences)}")
        for r in refusals:
            refused[live[r.index]] = refusal_error(link.name, r.code, r.field, r.message)
        keep = [j for j in range(len(sequences)) if j not in out]
        return [live[j] for j in keep], [sequences[j] for j in keep]

    def _check(self, epoch: int) -> None:
        if self.broken:
            raise Unavailable("stage", f"the mesh cannot serve: {self.broken}")
        if self.epoch != epoch:
            raise KVLost(f"a stage was replaced (pipeline epoch {epoch} -> {self.epoch})")

    async def free(self, sequence_ids: list[int]) -> None:
        if sequence_ids:
            await asyncio.gather(*(link.free(sequence_ids) for link in self.links))

    async def close(self) -> None:
        for link in self.links:
            await link.close()
        await self.data_planes.close()
