"""Continuous batching in micro-batches: every running sequence steps once per round of its lane.

New requests join a lane at its next step, finished and cancelled ones leave and their KV cache is
freed on every stage. With `micro_batches` M > 1 the running sequences are spread over M lanes
that step concurrently, so with S stages up to M micro-batches are in flight and every stage
works while the others do (M = S fills the pipeline). With `prefill_chunk_tokens` C > 0 a lane's
step carries at most C prompt tokens: a long prompt is prefilled over several steps while the
lane's other sequences go on decoding. The scheduler is core code: the pipeline it drives is any
object with `step` and `free` (the router's gRPC pipeline in production, a local chain of
StageModels in tests).
"""

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
        """token_ids: [N] int64 packed in slice order -> logits [num_slices, V] fp32 at each slice's last token.

        With micro-batches, up to M calls run concurrently, on disjoint sequences; each call's
        slices go through every stage in order, and calls reach each stage in the order made."""

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
    prefilled_tokens: int = 0        # prompt tokens already through the pipeline
    cancelled: bool = False
    finished: bool = False

    @property
    def prefilling(self) -> bool:
        return self.prefilled_tokens < len(self.prompt)

    def next_slice(self, max_prompt_tokens: int) -> tuple[SequenceSlice, list[int]]:
        """The tokens of this sequence's next step: up to `max_prompt_tokens` (>= 1) of the prompt
        while prefilling, else the last generated token."""
        if self.prefilling:
            start = self.prefilled_tokens
            count = min(len(self.prompt) - start, max_prompt_tokens)
            return SequenceSlice(self.sequence_id, start, count), self.prompt[start:start + count]
        position = len(self.prompt) + len(self.generated) - 1
        return SequenceSlice(self.sequence_id, position, 1), self.generated[-1:]


class Scheduler:
    def __init__(self, pipeline: Pipeline, max_batch_sequences: int = 64, micro_batches: int = 1,
                 prefill_chunk_tokens: int = 0):
        """micro_batches: lanes stepping concurrently (>= 1); prefill_chunk_tokens: prompt tokens per
        lane step (0 = whole prompts in one step)."""
        if max_batch_sequences < 1 or micro_batches < 1 or prefill_chunk_tokens < 0:
            raise ValueError(f"max_batch_sequences {max_batch_sequences} and micro_batches {micro_batches} "
                             f"must be >= 1, prefill_chunk_tokens {prefill_chunk_tokens} >= 0")
        self.pipeline = pipeline
        self.max_batch_sequences = max_batch_sequences
        self.micro_batches = micro_batches
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.waiting: list[Sequence] = []
        self.lanes: list[list[Sequence]] = [[] for _ in range(micro_batches)]  # running, per lane
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.steps = 0

    @property
    def running(self) -> list[Sequence]:
        return [sequence for lane in self.lanes for sequence in lane]

    @property
    def active(self) -> int:
        return len(self.waiting) + sum(len(lane) for lane in self.lanes)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(lane), name=f"scheduler-lane-{lane}")
                       for lane in range(self.micro_batches)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def submit(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)
        self._wake.set()

    def cancel(self, sequence: Sequence) -> None:
        """Ask that `sequence` leave at its lane's next step boundary; its KV is freed then."""
        if not sequence.finished:
            sequence.cancelled = True
            self._wake.set()

    async def _loop(self, lane: int) -> None:
        while True:
            stepped = False
            if self.waiting or self.lanes[lane]:
                try:
                    stepped = await self.step(lane)
                except Exception:  # a bug in a step must not stop the router from serving
                    log.exception("scheduler step failed")
            if not stepped:  # nothing for this lane (or no room): wait for a submit, cancel or retire
                self._wake.clear()
                await self._wake.wait()

    def _join(self, lane: int) -> list[Sequence]:
        """Waiting sequences that join `lane` now: its fair share of everything active, within the batch limit."""
        room = self.max_batch_sequences - sum(len(other) for other in self.lanes)
        share = -(-self.active // self.micro_batches) - len(self.lanes[lane])  # ceil(active / M) - mine
        count = max(0, min(room, share, len(self.waiting)))
        joining, self.waiting = self.waiting[:count], self.waiting[count:]
        return joining

    async def step(self, lane: int = 0) -> bool:
        """One step of one lane: its running sequences plus those joining, prompt tokens within budget.
        Returns whether anything went through the pipeline."""
        await self._drop_cancelled(lane)
        batch = self.lanes[lane] + self._join(lane)
        self.lanes[lane] = batch
        budget = self.prefill_chunk_tokens or float("inf")
        stepping, slices, token_ids = [], [], []
        for sequence in batch:
            if sequence.prefilling and budget <= 0:
                continue  # its prompt goes on at a later step; the others decode meanwhile
            piece, ids = sequence.next_slice(int(min(budget, len(sequence.prompt))))
            if sequence.prefilling:
                budget -= piece.num_tokens
            stepping.append(sequence)
            slices.append(piece)
            token_ids.extend(ids)
        if not stepping:
            return False
        try:
            logits = await self.pipeline.step(slices, torch.tensor(token_ids, dtype=torch.int64))  # [B, V]
        except Exception as error:
            log.warning("step failed for %d sequences: %s", len(stepping), error)
            for sequence in stepping:
                sequence.finished = True
                sequence.events.put_nowait(error)
            self.lanes[lane] = [s for s in self.lanes[lane] if not s.finished]
            await self.pipeline.free([s.sequence_id for s in stepping])
            self._wake.set()  # room for waiting sequences
            return True
        self.steps += 1
        done = []
        for sequence, piece, row in zip(stepping, slices, logits):
            if sequence.prefilling:
                sequence.prefilled_tokens += piece.num_tokens
                if sequence.prefilling:
                    continue  # a prompt chunk short of the prompt's end: no token to sample yet
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
        await self._retire(lane, done)
        return True

    async def _drop_cancelled(self, lane: int) -> None:
        self.waiting = [s for s in self.waiting if not s.cancelled]
        await self._retire(lane, [s for s in self.lanes[lane] if s.cancelled])

    async def _retire(self, lane: int, sequences: list[Sequence]) -> None:
        if not sequences:
            return
        for sequence in sequences:
            sequence.finished = True
        self.lanes[lane] = [s for s in self.lanes[lane] if not s.finished]
        self._wake.set()  # room for waiting sequences, in any lane
        await self.pipeline.free([s.sequence_id for s in sequences])
