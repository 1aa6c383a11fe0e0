"""ExpertLoadMeter: what one expert server computed, for the router's load accounting and drains.

Counts token rows per (layer, expert) and seconds spent computing in one-second buckets (the
last `MAX_WINDOW_S` kept, plus totals since start), so any caller can ask for any recent window
without resetting anything; and tracks which experts calls are computing right now, so that
`DropExperts` can wait for them (drain) before freeing weights."""

import asyncio
import collections
import time
from collections.abc import Callable, Iterable, Sequence

BUCKET_S = 1.0
MAX_WINDOW_S = 600.0
# record_soon's calls are counted in batches, on the event loop, at most this long after they ended
# (a timer per batch rather than a callback per call: the per-call part stays one append, on the
# cold caches a kernel leaves); report() counts them at once.
RECORD_DELAY_S = 0.25

ExpertKey = tuple[int, int]  # (layer, expert)


class ExpertLoadMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic, record_delay_s: float = RECORD_DELAY_S):
        self.clock = clock
        self.record_delay_s = record_delay_s
        self.started = clock()
        # bucket index (int(t / BUCKET_S)) -> (tokens per expert, busy seconds); oldest first
        self._buckets: collections.OrderedDict[int, tuple[collections.Counter, list[float]]] = collections.OrderedDict()
        self.total_tokens: collections.Counter[ExpertKey] = collections.Counter()
        self.total_busy_s = 0.0
        # The calls computing now (in a dict as an ordered set): which experts are in use is asked
        # rarely (drains), so it is worked out then rather than counted around every call.
        self._calls: dict[_Computing, None] = {}
        self._pending: list[tuple] = []  # record_soon's calls not recorded yet: (layer, experts, counts, start, end)
        self._released = asyncio.Event()

    def _bucket(self, now: float) -> tuple[collections.Counter, list[float]]:
        index = int(now / BUCKET_S)
        if index not in self._buckets:
            self._buckets[index] = (collections.Counter(), [0.0])
            oldest = index - int(MAX_WINDOW_S / BUCKET_S)
            while next(iter(self._buckets)) < oldest:
                self._buckets.popitem(last=False)
        return self._buckets[index]

    def computing(self, groups: Iterable[tuple[int, int, int]]) -> "_Computing":
        """Around one call's compute (a `with` block): groups are (layer, expert, tokens). The experts
        count as in use until the block ends; tokens and busy time are recorded if it completes."""
        return _Computing(self, [(layer, (expert,), (tokens,)) for layer, expert, tokens in groups])

    def record_soon(self, layer: int, experts: Sequence[int], counts: Sequence[int], start: float, end: float) -> None:
        """A call that computed counts[i] tokens of experts[i] of `layer` from `start` to `end` (this
        meter's clock) without yielding to the event loop, so that no drain could find them in use:
        recorded on the loop within `record_delay_s` (with the other calls of that while, in one
        batch), or now without a loop. report() counts it at once either way. `experts` and
        `counts` are kept as they are."""
        pending = self._pending
        pending.append((layer, experts, counts, start, end))
        if len(pending) == 1:  # the first of a batch: the loop records them all in a while
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._record_pending()
                return
            loop.call_later(self.record_delay_s, self._record_pending)

    def _record_pending(self) -> None:
        pending, self._pending = self._pending, []
        for layer, experts, counts, start, end in pending:
            self._record([(layer, experts, counts)], start, end)

    def _record(self, runs: list, start: float, end: float) -> None:
        tokens, busy = self._bucket(end)
        total = self.total_tokens
        for layer, experts, counts in runs:
            for expert, count in zip(experts, counts):
                key = (layer, expert)
                tokens[key] += count
                total[key] += count
        busy[0] += end - start
        self.total_busy_s += end - start

    def in_use(self, keys: Iterable[ExpertKey]) -> list[ExpertKey]:
        """Those of `keys` that some call is computing now."""
        busy = {(layer, expert) for call in self._calls for layer, experts, _ in call.runs for expert in experts}
        return [key for key in keys if key in busy]

    async def drained(self, keys: Iterable[ExpertKey], timeout: float) -> list[ExpertKey]:
        """Wait (at most `timeout` s) until no call computes any of `keys`; return those still in use."""
        keys = list(keys)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while busy := self.in_use(keys):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return busy
            self._released.clear()
            try:
                await asyncio.wait_for(self._released.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return []

    def report(self, window_s: float) -> tuple[dict[ExpertKey, int], float, float]:
        """(tokens per expert, busy seconds, seconds covered) over the last `window_s` seconds
        (0 = since start). The window is counted in whole buckets: it may include up to one
        bucket more than asked."""
        self._record_pending()
        now = self.clock()
        uptime = now - self.started
        if window_s <= 0:
            return dict(self.total_tokens), self.total_busy_s, uptime
        first = int((now - window_s) / BUCKET_S)
        tokens: collections.Counter[ExpertKey] = collections.Counter()
        busy = 0.0
        for index, (bucket_tokens, bucket_busy) in self._buckets.items():
            if index >= first:
                tokens.update(bucket_tokens)
                busy += bucket_busy[0]
        return dict(tokens), busy, min(window_s, uptime)


class _Computing:
    """One call computing (ExpertLoadMeter.computing): runs are (layer, experts, counts) each."""

    __slots__ = ("meter", "runs", "start")

    def __init__(self, meter: ExpertLoadMeter, runs: list[tuple[int, Sequence[int], Sequence[int]]]):
        self.meter, self.runs = meter, runs

    def __enter__(self) -> "_Computing":
        self.meter._calls[self] = None
        self.start = self.meter.clock()
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        meter = self.meter
        try:
            if kind is None:
                meter._record(self.runs, self.start, meter.clock())
        finally:
            del meter._calls[self]
            meter._released.set()
        return False
