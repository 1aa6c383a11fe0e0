"""CallDeadlines: asyncio.timeout for a stage's expert calls, at a lower cost per call.

Each MoE layer's call waits a few milliseconds under a deadline of seconds. asyncio.timeout makes a
timer per call (a TimerHandle, a context copy, a heap push, its cancellation: ~25 us of the stage's
critical path per layer on a busy 2-core host). Here a call's deadline is an entry in a dict, and
one timer, at the earliest deadline of the calls in flight when it was armed, cancels the calls
past theirs when it fires and re-arms itself for the rest: a call arms it only when none is armed
(or when its own deadline comes first). A call past its deadline ends as under asyncio.timeout:
its task is cancelled (so what it awaits sees CancelledError and cleans up) and the call raises
TimeoutError, unless someone else cancelled the task too (then CancelledError goes on).

    with deadlines.bound(timeout):  # in a coroutine, as `async with asyncio.timeout(timeout):`
        ... await the call ...
"""

import asyncio


class CallDeadlines:
    """Deadlines of calls in flight on one event loop, one call per task at a time."""

    __slots__ = ("_deadlines", "_expired", "_timer", "_timer_at", "_loop")

    def __init__(self):
        self._deadlines: dict[asyncio.Task, tuple[float, int]] = {}  # task -> (deadline in loop time, its cancelling() at start)
        self._expired: set[asyncio.Task] = set()  # tasks the timer cancelled, until their call ends
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the armed timer fires (loop time)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the armed timer

    def bound(self, timeout: float) -> "_Bound":
        """A `with` block of the current task bounded by `timeout` seconds from its start: past it
        the task is cancelled and the block raises TimeoutError (start, expired and end, below)."""
        return _Bound(self, timeout)

    def start(self, timeout: float) -> asyncio.Task:
        """The current task's call starts, bounded by `timeout` seconds from now; returns the task."""
        task = asyncio.current_task()
        loop = task.get_loop()
        when = loop.time() + timeout
        assert task not in self._deadlines, "one call per task at a time"
        self._deadlines[task] = (when, task.cancelling())
        if self._timer is None or when < self._timer_at or self._loop is not loop:
            self._arm(loop, when)
        return task

    def expired(self, task: asyncio.Task) -> None:
        """In the call's `except CancelledError`: raises TimeoutError when its deadline cancelled the
        task and no other cancellation came since (else returns, for the caller to re-raise)."""
        if task in self._expired:
            self._expired.discard(task)
            if task.uncancel() <= self._deadlines[task][1]:
                raise TimeoutError

    def end(self, task: asyncio.Task) -> None:
        """The call ended (in its `finally`)."""
        del self._deadlines[task]
        if task in self._expired:  # its deadline passed as it was ending anyway: the cancellation is ours
            self._expired.discard(task)
            task.uncancel()

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at, self._loop = loop.call_at(when, self._fire), when, loop

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        now, later = loop.time(), None
        for task, (when, _) in self._deadlines.items():
            if task.get_loop() is not loop:
                continue  # (a call on another loop arms its own timer)
            if when <= now:
                if task not in self._expired:
                    self._expired.add(task)
                    task.cancel()
            elif later is None or when < later:
                later = when
        if later is not None:
            self._arm(loop, later)

    def close(self) -> None:
        """Stop the timer (the calls in flight are no longer bounded)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Bound:
    """CallDeadlines.bound's block."""

    __slots__ = ("deadlines", "timeout", "task")

    def __init__(self, deadlines: CallDeadlines, timeout: float):
        self.deadlines, self.timeout = deadlines, timeout

    def __enter__(self) -> None:
        self.task = self.deadlines.start(self.timeout)

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if kind is asyncio.CancelledError:
                self.deadlines.expired(self.task)  # TimeoutError (from the cancellation) when ours
        finally:
            self.deadlines.end(self.task)
        return False
