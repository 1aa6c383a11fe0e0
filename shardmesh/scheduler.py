"""Continuous batching in micro-batches: every running sequence steps once per round of its lane.

New requests join a lane at its next step, finished and cancelled ones leave and their KV cache is
freed on every stage. With `micro_batches` M > 1 the running sequences are spread over M lanes
that step concurrently, so with S stages up to M micro-batches are in flight and every stage
works while the others do (M = S fills the pipeline). With `prefill_chunk_tokens` C > 0 a lane's
step carries at most C prompt tokens: a long prompt is prefilled over several steps while the
lane's other sequences go on decoding. When the pipeline replaces a stage (its `epoch` changes:
router/failover.py), every running sequence has lost its KV cache there: at its lane's next step
the scheduler frees it on every stage and replays its tokens so far (prompt + generated) as one
prefill from position 0, then samples the next token from that replay's logits (as Petals does;
see `Scheduler._replay`). The scheduler is core code: the pipeline it drives is any
object with `step` and `free` (the router's gRPC pipeline in production, a local chain of
StageModels in tests).
"""

import array
import asyncio
import logging
import typing

import torch

from shardmesh.errors import Unavailable
from shardmesh.sampling import GreedyTokens, greedy_token_ids
# The sequence types live in shardmesh.sequence; importable from here as before.
from shardmesh.sequence import MAX_REPLAYS, KVLost, Sequence, SequenceSlice, TokenEvent  # noqa: F401
from shardmesh.step_refusals import SequencesRefused

log = logging.getLogger(__name__)


class Pipeline(typing.Protocol):
    async def step(self, slices: list[SequenceSlice], token_ids: torch.Tensor,
                   greedy: bool = False) -> torch.Tensor | GreedyTokens:
        """token_ids: [N] int64 packed in slice order -> logits [num_slices, V] fp32 at each slice's last token,
        or (only when `greedy`: every slice samples greedily and wants no logits) GreedyTokens, each row's argmax.

        With micro-batches, up to M calls run concurrently, on disjoint sequences; each call's
        slices go through every stage in order, and calls reach each stage in the order made."""

    async def free(self, sequence_ids: list[int]) -> None:
        """Drop these sequences' KV caches everywhere (best effort, never raises)."""

    # Optional: `epoch` (int) changes whenever a stage is replaced; a sequence whose KV caches
    # were built at another epoch is replayed. A step during which it changes raises KVLost.
    # Without it the pipeline never loses KV.


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
        self._outbox: list[tuple[Sequence, TokenEvent | Exception]] = []  # events not handed over yet (_emit)

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

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until no sequence waits or runs; return whether none does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.active and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        return not self.active

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

    def _emit(self, sequence: Sequence, event: TokenEvent | Exception) -> None:
        """Put `event` on its sequence's events at the event loop's next turn, in the order emitted:
        after this lane's next step request is written (a step does not wait before that write),
        so that handing tokens to the client streams is not on the path of every step. The step's
        events are put in one loop (`_hand_over`): each reader's SequenceEvents.render (the router's
        response per token) runs there, back to back."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._outbox.append((sequence, event))

    def _hand_over(self) -> None:
        outbox, self._outbox = self._outbox, []
        for sequence, event in outbox:
            sequence.events.put_nowait(event)

    def _join(self, lane: int) -> list[Sequence]:
        """Waiting sequences that join `lane` now: its fair share of everything active, within the batch limit."""
        if not self.waiting:
            return []
        room = self.max_batch_sequences - sum(len(other) for other in self.lanes)
        share = -(-self.active // self.micro_batches) - len(self.lanes[lane])  # ceil(active / M) - mine
        count = max(0, min(room, share, len(self.waiting)))
        joining, self.waiting = self.waiting[:count], self.waiting[count:]
        epoch = getattr(self.pipeline, "epoch", 0)
        for sequence in joining:  # nothing cached anywhere yet: consistent with the pipeline as it is now
            sequence.kv_epoch = epoch
        return joining

    async def step(self, lane: int = 0) -> bool:
        """One step of one lane: its running sequences plus those joining, prompt tokens within budget.
        Returns whether anything went through the pipeline."""
        await self._drop_cancelled(lane)
        batch = self.lanes[lane] = self.lanes[lane] + self._join(lane)
        await self._replay(lane, batch)
        budget = self.prefill_chunk_tokens or float("inf")
        stepping, slices, token_ids = [], [], []
        greedy_step = True  # every sequence samples greedily and wants no logits
        for sequence in batch:
            if sequence.prefilling:
                if budget <= 0:
                    continue  # its prompt goes on at a later step; the others decode meanwhile
                piece, ids = sequence.next_slice(int(min(budget, sequence.context_length)))
                budget -= piece.num_tokens
                token_ids += ids
            else:  # its last generated token (Sequence.next_slice(1), inline: every sequence, every step)
                generated = sequence.generated
                piece = SequenceSlice(sequence.sequence_id, len(sequence.prompt) + len(generated) - 1, 1)
                token_ids.append(generated[-1])
            stepping.append(sequence)
            slices.append(piece)
            greedy_step = greedy_step and sequence.sampler.greedy and not sequence.return_logits
        if not stepping:
            return False
        try:
            # (over an array's memory: torch.tensor of a list costs several times more; never empty here)
            token_tensor = torch.frombuffer(array.array("q", token_ids), dtype=torch.int64)  # [N]
            logits = await self.pipeline.step(slices, token_tensor, greedy=greedy_step)  # [B, V] or GreedyTokens
        except SequencesRefused as refusal:  # a stage refused some on their own: they fail, the others go on
            for index, error in refusal.errors.items():
                stepping[index].finished = True
                self._emit(stepping[index], error)
            await self._retire(lane, [stepping[index] for index in refusal.errors])  # frees their KV
            kept = refusal.kept(len(stepping))
            stepping, slices, logits = [stepping[i] for i in kept], [slices[i] for i in kept], refusal.logits  # [B', V]
            if not stepping:
                return True
        except KVLost as error:  # a stage was replaced: these sequences replay at the lane's next step
            log.warning("step of %d sequences lost its KV caches (%s): replaying them", len(stepping), error)
            for sequence in stepping:
                sequence.lost_steps += 1
                if sequence.lost_steps > MAX_REPLAYS:
                    sequence.finished = True
                    self._emit(sequence, Unavailable("stage", f"sequence {sequence.sequence_id}: "
                                                     f"{sequence.lost_steps} steps in a row lost the KV "
                                                     f"caches (stages replaced): giving up"))
            await self._retire(lane, [s for s in stepping if s.finished])
            return True
        except Exception as error:
            log.warning("step failed for %d sequences: %s", len(stepping), error)
            for sequence in stepping:
                sequence.finished = True
                self._emit(sequence, error)
            self.lanes[lane] = [s for s in self.lanes[lane] if not s.finished]
            await self.pipeline.free([s.sequence_id for s in stepping])
            self._wake.set()  # room for waiting sequences
            return True
        self.steps += 1
        done = []
        # Greedy rows' tokens in one argmax over the batch (per row: ~80 us each at V=32000); the
        # same index a row's own argmax gives (the first maximum).
        if isinstance(logits, GreedyTokens):  # the last stage chose them: no rows here
            greedy, logits = logits.token_ids, [None] * len(stepping)
        else:
            greedy = greedy_token_ids(logits) if any(s.sampler.greedy for s in stepping) else None  # [B]
        emit = self._emit
        for index, (sequence, piece, row) in enumerate(zip(stepping, slices, logits)):
            sequence.lost_steps = 0
            generated = sequence.generated
            fed = sequence.fed_tokens = sequence.fed_tokens + piece.num_tokens
            if fed < len(sequence.prompt) + len(generated):  # (Sequence.context_length)
                continue  # a prompt (or replay) chunk short of its end: no token to sample yet
            if sequence.cancelled:
                done.append(sequence)
                continue
            sampler = sequence.sampler
            token_id = greedy[index] if sampler.greedy else sampler(row)
            generated.append(token_id)
            count = len(generated)
            finish = "stop" if token_id in sequence.stop_token_ids else "length" if count >= sequence.max_new_tokens else None
            emit(sequence, TokenEvent(token_id, count - 1, finish, row.clone() if sequence.return_logits else None))
            if finish:
                done.append(sequence)
        await self._retire(lane, done)
        return True

    async def _replay(self, lane: int, batch: list[Sequence]) -> None:
        """Sequences of `batch` whose KV caches were built before the pipeline's epoch changed (a
        stage was replaced) are freed on every stage and fed again from position 0.

        Why all stages: the replacement lacks the KV, and its inputs (hidden states of every
        position) come from the stages before it, which the router does not keep; those stages may
        also hold one step more than the others (the step that failed). Rebuilding everywhere costs
        one prefill of the prefix per stage, once per failover, and each stage receives the prefix
        exactly once; the intact stages after the replaced one are the only avoidable work."""
        epoch = getattr(self.pipeline, "epoch", 0)
        stale = [s for s in batch if s.kv_epoch != epoch]
        if not stale:
            return
        for sequence in stale:
            sequence.kv_epoch = epoch
        lost = [s for s in stale if s.fed_tokens]
        for sequence in lost:
            sequence.fed_tokens = 0
            sequence.replays += 1
        if lost:
            log.warning("replaying %d sequences (%d tokens) after a stage was replaced", len(lost),
                        sum(s.context_length for s in lost))
        # Every stale one, also one with nothing fed: its first step may have failed on a later stage
        # after the earlier ones cached it (a stage that lives is replayed on, its caches kept).
        await self.pipeline.free([s.sequence_id for s in stale])

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
