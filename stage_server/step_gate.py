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
import contextlib
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

    @contextlib.asynccontextmanager
    async def sequences(self, sequence_ids: Iterable[int]):
        """Hold these sequences: waits for earlier holders of any of them and for an earlier exclusive()."""
        sequence_ids = list(dict.fromkeys(sequence_ids))
        done = asyncio.get_running_loop().create_future()
        before = _pending({self._tails.get(i) for i in sequence_ids} | {self._barrier})
        for sequence_id in sequence_ids:
            self._tails[sequence_id] = done
        self._running.add(done)
        try:
            async with _held(before, done):
                yield
        finally:
            self._running.discard(done)
            for sequence_id in sequence_ids:
                if self._tails.get(sequence_id) is done:
                    del self._tails[sequence_id]

    @contextlib.asynccontextmanager
    async def exclusive(self):
        """Hold the whole stage: waits for every earlier holder; later ones wait for this one."""
        done = asyncio.get_running_loop().create_future()
        before = _pending({*self._running, self._barrier})
        self._barrier = done
        try:
            async with _held(before, done):
                yield
        finally:
            if self._barrier is done:
                self._barrier = None


def _pending(futures) -> list[asyncio.Future]:
    return [f for f in futures if f is not None and not f.done()]


@contextlib.asynccontextmanager
async def _held(before: list[asyncio.Future], done: asyncio.Future):
    """Wait for `before`, then run the body; `done` resolves when the body ends or, if the wait
    itself was cancelled, once `before` has finished (successors never overtake a predecessor)."""
    try:
        if before:
            await asyncio.wait(before)  # never cancels what it waits for
    except BaseException:
        remaining = _pending(before)
        if remaining:
            asyncio.gather(*remaining).add_done_callback(lambda _: done.done() or done.set_result(None))
        else:
            done.set_result(None)
        raise
    try:
        yield
    finally:
        done.set_result(None)


async def read_ahead(requests: AsyncIterable, start: Callable[[object], Awaitable], limit: int):
    """Yield (request, task) in request order, each task (`start(request)`) done. A request's task is
    created as soon as it is read, while up to `limit` are not yet yielded, so later steps run while
    earlier ones compute; the task's context is the consumer's at that moment. Closing this
    generator (use contextlib.aclosing) cancels every task not yet yielded and the read in progress."""
    iterator = aiter(requests)
    pending: collections.deque = collections.deque()  # (request, task), in request order
    reading: asyncio.Task | None = None
    ended = False
    loop = asyncio.get_running_loop()
    try:
        while True:
            if reading is None and not ended and len(pending) < limit:
                reading = loop.create_task(_next(iterator))
            if pending and pending[0][1].done():
                yield pending.popleft()
                continue
            waiting = [t for t in (reading, pending[0][1] if pending else None) if t is not None]
            if not waiting:
                return
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if reading is not None and reading.done():
                read, reading = reading, None
                try:
                    request = read.result()
                except StopAsyncIteration:
                    ended = True
                    continue
                pending.append((request, loop.create_task(start(request))))
    finally:
        for task in [reading, *(task for _, task in pending)]:
            if task is not None and not task.done():
                task.cancel()
            elif task is not None and not task.cancelled():
                task.exception()  # retrieved: the stream has ended, nobody will ask


async def _next(iterator):
    return await anext(iterator)
