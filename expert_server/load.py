"""ExpertLoadMeter: what one expert server computed, for the router's load accounting and drains.

Counts token rows per (layer, expert) and seconds spent computing in one-second buckets (the
last `MAX_WINDOW_S` kept, plus totals since start), so any caller can ask for any recent window
without resetting anything; and tracks which experts calls are computing right now, so that
`DropExperts` can wait for them (drain) before freeing weights."""

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Iterable

BUCKET_S = 1.0
MAX_WINDOW_S = 600.0

ExpertKey = tuple[int, int]  # (layer, expert)


class ExpertLoadMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.started = clock()
        # bucket index (int(t / BUCKET_S)) -> (tokens per expert, busy seconds); oldest first
        self._buckets: collections.OrderedDict[int, tuple[collections.Counter, list[float]]] = collections.OrderedDict()
        self.total_tokens: collections.Counter[ExpertKey] = collections.Counter()
        self.total_busy_s = 0.0
        self._in_use: collections.Counter[ExpertKey] = collections.Counter()  # calls computing each expert now
        self._released = asyncio.Event()

    def _bucket(self, now: float) -> tuple[collections.Counter, list[float]]:
        index = int(now / BUCKET_S)
        if index not in self._buckets:
            self._buckets[index] = (collections.Counter(), [0.0])
            oldest = index - int(MAX_WINDOW_S / BUCKET_S)
            while next(iter(self._buckets)) < oldest:
                self._buckets.popitem(last=False)
        return self._buckets[index]

    @contextlib.contextmanager
    def computing(self, groups: Iterable[tuple[int, int, int]]):
        """Around one call's compute: groups are (layer, expert, tokens). The experts count as in
        use until the block ends; tokens and busy time are recorded if it completes."""
        groups = list(groups)
        in_use = self._in_use  # (plain dict operations: this runs around every call, every layer)
        for layer, expert, _ in groups:
            in_use[layer, expert] = in_use.get((layer, expert), 0) + 1
        start = self._clock()
        try:
            yield
            end = self._clock()
            tokens, busy = self._bucket(end)
            total = self.total_tokens
            for layer, expert, count in groups:
                tokens[layer, expert] += count
                total[layer, expert] += count
            busy[0] += end - start
            self.total_busy_s += end - start
        finally:
            for layer, expert, _ in groups:
                left = in_use[layer, expert] - 1
                if left:
                    in_use[layer, expert] = left
                else:  # no zero counts kept
                    del in_use[layer, expert]
            self._released.set()

    def in_use(self, keys: Iterable[ExpertKey]) -> list[ExpertKey]:
        """Those of `keys` that some call is computing now."""
        return [key for key in keys if self._in_use[key] > 0]

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
        now = self._clock()
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
