"""Continuous batching: every step runs all active sequences through the pipeline once.

New requests join the running batch at the next step (their whole prompt as a prefill chunk),
finished and cancelled ones leave and their KV cache is freed on every stage. The scheduler is
core code: the pipeline it drives is any object with `step` and `free` (the router's gRPC
pipeline in production, a local chain of StageModels in tests)."""

import asyncio
import dataclasses
import logging
import typing

import torch

from shardmesh.sampling import Sampler

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SequenceSlice:
    sequence_id: int
    start_position: int
    num_tokens: int


class Pipeline(typing.Protocol):
    async def step(self, slices: list[SequenceSlice], token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [N] int64 packed in slice order -> logits [num_slices, V] fp32 at each slice's last token."""

    async def free(self, sequence_ids: list[int]) -> None:
        """Drop these sequences' KV caches everywhere (best effort, never raises)."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    token_id: int
    index: int                       # among generated tokens
    finish_reason: str | None        # "length" | "stop" | None
    logits: torch.Tensor | None      # [V] fp32 when asked for


@dataclasses.dataclass(eq=False)
class Sequence:
    sequence_id: int
    prompt: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    sampler: Sampler
    return_logits: bool = False
    generated: list[int] = dataclasses.field(default_factory=list)
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)  # TokenEvent | Exception
    prefilled: bool = False
    cancelled: bool = False
    finished: bool = False

    def next_slice(self) -> tuple[SequenceSlice, list[int]]:
        if not self.prefilled:
            return SequenceSlice(self.sequence_id, 0, len(self.prompt)), self.prompt
        position = len(self.prompt) + len(self.generated) - 1
        return SequenceSlice(self.sequence_id, position, 1), self.generated[-1:]


class Scheduler:
    def __init__(self, pipeline: Pipeline, max_batch_sequences: int = 64):
        self.pipeline = pipeline
        self.max_batch_sequences = max_batch_sequences
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0

    @property
    def active(self) -> int:
        return len(self.waiting) + len(self.running)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)
        self._wake.set()

    def cancel(self, sequence: Sequence) -> None:
        """Ask that `sequence` leave at the next step boundary; its KV is freed then."""
        if not sequence.finished:
            sequence.cancelled = True
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self.step()
            except Exception:  # a bug in a step must not stop the router from serving
                log.exception("scheduler step failed")

    async def step(self) -> None:
        await self._drop_cancelled()
        room = self.max_batch_sequences - len(self.running)
        joining, self.waiting = self.waiting[:max(room, 0)], self.waiting[max(room, 0):]
        batch = self.running + joining
        if not batch:
            return
        slices, token_ids = [], []
        for sequence in batch:
            piece, ids = sequence.next_slice()
            slices.append(piece)
            token_ids.extend(ids)
        try:
            logits = await self.pipeline.step(slices, torch.tensor(token_ids, dtype=torch.int64))  # [B, V]
        except Exception as error:
            log.warning("step failed for %d sequences: %s", len(batch), error)
            for sequence in batch:
                sequence.finished = True
                sequence.events.put_nowait(error)
            self.running = [s for s in self.running if s not in batch]
            await self.pipeline.free([s.sequence_id for s in batch])
            return
        self.steps += 1
        self.running = batch
        done = []
        for sequence, row in zip(batch, logits):
            sequence.prefilled = True
            if sequence.cancelled:
                done.append(sequence)
                continue
            token_id = sequence.sampler(row)
            sequence.generated.append(token_id)
            finish = None
            if token_id in sequence.stop_token_ids:
                finish = "stop"
            elif len(sequence.generated) >= sequence.max_new_tokens:
                finish = "length"
            sequence.events.put_nowait(TokenEvent(token_id, len(sequence.generated) - 1, finish,
                                                  row.clone() if sequence.return_logits else None))
            if finish:
                done.append(sequence)
        await self._retire(done)

    async def _drop_cancelled(self) -> None:
        self.waiting = [s for s in self.waiting if not s.cancelled]
        await self._retire([s for s in self.running if s.cancelled])

    async def _retire(self, sequences: list[Sequence]) -> None:
        if not sequences:
            return
        for sequence in sequences:
            sequence.finished = True
        self.running = [s for s in self.running if not s.finished]
        await self.pipeline.free([s.sequence_id for s in sequences])
