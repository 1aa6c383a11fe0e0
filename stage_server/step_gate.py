"""StepGate: which operations on a stage's KV cache may run at the same time.

Steps of disjoint sequence sets run concurrently (one computes while another awaits its experts);
a step that shares a sequence with an earlier one waits for it, so each sequence's steps run one at
a time in arrival order. `exclusive()` (a placement switch, every step of a tensor-parallel stage,
whose ranks must run the same steps in the same order) waits for everything admitted before it and
holds back everything admitted after it.

    async with gate.sequences([3, 7]):   # steps and frees of sequences 3 and 7
        ...
    async with gate.exclusive():         # nothing else at all
        ...

Admission happens when the context is entered, before any await: the order of `async with` is the
order of execution wherever two operations conflict. Each holder leaves behind a future that its
successors wait for; a holder cancelled while it waits resolves its future only once its own
predecessors are done, so cancelling a waiter never lets its successors overtake a running step.

`read_ahead` feeds a Step stream's requests to concurrent step tasks while the responses still go
out in request order.
"""

import asyncio
import collections
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable

READ_AHEAD = 4  # steps of one Step stream started before the oldest of them has answered


class StepGate:
    def __init__(self):
        self._tails: dict[int, asyncio.Future] = {}  # sequence id -> done future of its last admitted holder
        self._running: set[asyncio.Future] = set()   # done futures of every admitted, unfinished sequences() holder
        self._barrier: asyncio.Future | None = None  # done future of the last admitted exclusive() holder

    @property
    def busy(self) -> int:
        """sequences() holders admitted and not finished (running or waiting)."""
        return len(self._running)

    def sequences(self, sequence_ids: Iterable[int]) -> "_Hold":
        """Hold these sequences: waits for earlier holders of any of them and for an earlier exclusive()."""
        return _Hold(self, sequence_ids)

    def exclusive(self) -> "_Hold":
        """Hold the whole stage: waits for every earlier holder; later ones wait for this one."""
        return _Hold(self, None)


def _pending(futures) -> list[asyncio.Future]:
    return [f for f in futures if f is not None and not f.done()]


class _Hold:
    """One holder of a StepGate (an async context; a class, not a generator-based context manager:
    every step enters one, on a stage's cold caches between steps). Admitted when entered, before
    any await; then waits for `before`. Its `done` future resolves when the body ends or, if the
    wait itself was cancelled, once `before` has finished (successors never overtake a predecessor)."""

    __slots__ = ("gate", "sequence_ids", "done")

    def __init__(self, gate: StepGate, sequence_ids: Iterable[int] | None):
        self.gate, self.sequence_ids = gate, sequence_ids  # None: exclusive()

    async def __aenter__(self) -> None:
        gate = self.gate
        done = self.done = asyncio.get_running_loop().create_future()
        if self.sequence_ids is None:
            before = _pending({*gate._running, gate._barrier})
            gate._barrier = done
        else:
            sequence_ids = self.sequence_ids = list(dict.fromkeys(self.sequence_ids))
            before = _pending({gate._tails.get(i) for i in sequence_ids} | {gate._barrier})
            for sequence_id in sequence_ids:
                gate._tails[sequence_id] = done
            gate._running.add(done)
        if before:
            try:
                await asyncio.wait(before)  # never cancels what it waits for
            except BaseException:
                remaining = _pending(before)
                if remaining:  # its successors (admitted before or after this) wait for it: it goes after these
                    asyncio.gather(*remaining).add_done_callback(lambda _: self._resolve())
                    if self.sequence_ids is not None:
                        gate._running.discard(done)  # (not waiting any more: it counts as finished)
                else:
                    self._resolve()
                raise

    def _resolve(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self._leave()

    async def __aexit__(self, kind, error, traceback) -> bool:
        self.done.set_result(None)
        self._leave()
        return False

    def _leave(self) -> None:
        gate, done = self.gate, self.done
        if self.sequence_ids is None:
            if gate._barrier is done:
                gate._barrier = None
            return
        gate._running.discard(done)
        for sequence_id in self.sequence_ids:
            if gate._tails.get(sequence_id) is done:
                del gate._tails[sequence_id]


async def read_ahead(requests: AsyncIterable, start: Callable[[object], Awaitable], limit: int):
    """Yield (request, task) in request order, each task (`start(request)`) done. A request's task is
    created as soon as it is read, while up to `limit` are not yet yielded, so later steps run while
    earlier ones compute; the task's context is the consumer's at that moment (the consumer creates
    it, from what one reading task, kept for the whole stream, has read). Closing this generator
    (use contextlib.aclosing) cancels every task not yet yielded and the read in progress.

    Per request: one task (the step) and one future for each wait of the consumer, which a read or
    the oldest step's end resolves (no task per read, no asyncio.wait: on a stage's cold caches
    between steps each costs tens of microseconds)."""
    loop = asyncio.get_running_loop()
    ahead = _Ahead(aiter(requests), limit, loop)
    pending: collections.deque = collections.deque()  # (request, task) started, in request order
    watched = None  # the oldest task, once it has ahead.wake_up as a done callback
    try:
        while True:
            while ahead.arrived:  # start what was read, here: in the consumer's context
                request = ahead.arrived.popleft()
                pending.append((request, loop.create_task(start(request))))
            if pending and pending[0][1].done():
                ahead.yielded()
                yield pending.popleft()
                continue
            if ahead.error is not None:
                raise ahead.error
            if ahead.ended and not pending:
                return
            if pending and pending[0][1] is not watched:
                watched = pending[0][1]
                watched.add_done_callback(ahead.wake_up)
            ahead.wake = loop.create_future()
            try:
                await ahead.wake
            finally:
                ahead.wake = None
    finally:
        for task in [ahead.task, *(task for _, task in pending)]:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: the stream has ended, nobody will ask


class _Ahead:
    """read_ahead's reading task: reads while fewer than `limit` requests are read and not yielded,
    appends them to `arrived` and wakes the consumer (its `wake` future) at each, at the end and at
    an error (kept in `error`; the consumer raises it)."""

    def __init__(self, iterator, limit: int, loop: asyncio.AbstractEventLoop):
        self.iterator, self.limit, self.loop = iterator, limit, loop
        self.arrived: collections.deque = collections.deque()  # read, not started yet
        self.held = 0  # read and not yielded yet
        self.ended, self.error = False, None
        self.wake: asyncio.Future | None = None  # the consumer's, while it waits
        self.room: asyncio.Future | None = None  # the reader's, while `limit` are held
        self.task = loop.create_task(self._read())

    def wake_up(self, _=None) -> None:
        wake = self.wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def yielded(self) -> None:
        self.held -= 1
        room = self.room
        if room is not None and not room.done():
            room.set_result(None)

    async def _read(self) -> None:
        try:
            while True:
                while self.held >= self.limit:
                    self.room = self.loop.create_future()
                    await self.room
                request = await anext(self.iterator)
                self.held += 1
                self.arrived.append(request)
                self.wake_up()
        except StopAsyncIteration:
            self.ended = True
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the stream broke: the consumer raises it
            self.error = error
        finally:
            self.wake_up()
