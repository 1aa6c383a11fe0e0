"""Tarpit: a caller that keeps getting refused gets its further refusals late, for no CPU.

A refusal costs the router about what the refused client spends making the call (~0.25 ms of
grpc.aio CPU each, router/admission.py), so a client that retries without backoff in a closed
loop (~700 refusals/s from one process here) takes a good share of the router's CPU from the
admitted requests. The tarpit answers such a caller's refusals only after a delay (an
asyncio.sleep: the held call costs memory, not CPU), and a closed-loop caller sends its next
request only after the previous one ended, so its rate collapses to (its concurrent calls) /
(the delay) without any cooperation from it.

Per caller (router/caller_limit.py's identity) a score counts its refusals, decaying with time
constant TIME_CONSTANT_S: at a steady R refusals/s it is about R * TIME_CONSTANT_S. While the
score is above `refusals_per_second` * TIME_CONSTANT_S the caller is flooding: each refusal is
held for `base_delay_s` * score / threshold (so the delay grows while the flood persists), at most
`max_delay_s`. A caller refused now and then never comes near the threshold and is refused at
once, as is any caller while `max_held` calls are held already (the bound on held calls), and a
caller with `max_held_per_caller` of its own held (so that one flood cannot take every hold and
leave the others unslowed). The
map of callers is bounded (`max_callers`, least recently refused forgotten first). A held call
still ends RESOURCE_EXHAUSTED, its details saying to back off, with trailing metadata
`retry-after` (seconds, as HTTP's header) and `grpc-retry-pushback-ms` (gRPC's retry pushback).
Counted and held: Generate's refusals for a full admission queue (router/admission.py) and for a
caller past `--max-sequences-per-caller` (router/servicer.py), through `held_refusal`.
On by default at 50 refusals/s (`--tarpit-refusals-per-second 0` turns it off). Metrics (read at
scrape time, shardmesh/telemetry/metrics.py): `shardmesh_tarpit_refusals_total` (refusals counted),
`shardmesh_tarpit_held_refusals_total`, `shardmesh_tarpit_held_calls` (held now) and
`shardmesh_tarpit_flooding_callers` (callers above the threshold now). With `--caller-identity host` every client of
one host (or behind one proxy) is one caller: prefer `connection` or `token` there.
"""

import asyncio
import collections
import dataclasses
import math
import time

TIME_CONSTANT_S = 2.0


@dataclasses.dataclass(frozen=True)
class TarpitConfig:
    refusals_per_second: float  # a caller refused faster than this (sustained) is held
    base_delay_s: float = 0.1   # the hold at the threshold; it grows with the caller's score
    max_delay_s: float = 0.5
    max_held: int = 256         # calls held at once, all callers together; past it: refused at once
    max_held_per_caller: int = 64  # calls of one caller held at once; past it: refused at once
    max_callers: int = 4096     # callers remembered

    def __post_init__(self):
        if not self.refusals_per_second > 0:
            raise ValueError(f"tarpit refusals_per_second {self.refusals_per_second} must be > 0")
        if not 0 < self.base_delay_s <= self.max_delay_s:
            raise ValueError(f"tarpit delays need 0 < base_delay_s ({self.base_delay_s}) <= max_delay_s "
                             f"({self.max_delay_s})")
        if self.max_held < 0 or self.max_held_per_caller < 0 or self.max_callers < 1:
            raise ValueError(f"tarpit max_held {self.max_held} and max_held_per_caller {self.max_held_per_caller} "
                             f"must be >= 0 and max_callers {self.max_callers} >= 1")


class Tarpit:
    """Decides how long to hold each refusal (see the module docstring)."""

    def __init__(self, config: TarpitConfig, clock=time.monotonic):
        self.config, self.clock = config, clock
        self.threshold = config.refusals_per_second * TIME_CONSTANT_S  # score of a caller at the limit
        # caller -> (score, when it was last updated); most recently refused last
        self.scores: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self.held = 0      # calls being held now
        self.held_by: dict[str, int] = {}  # caller -> its calls being held now (callers with none absent)
        self.held_total = 0  # calls ever held (metrics, tests)
        self.refusals_total = 0  # refusals counted (metrics)

    def delay(self, caller: str) -> float:
        """Count one refusal of `caller`; the seconds to hold it (0.0: refuse at once)."""
        now = self.clock()
        self.refusals_total += 1
        score, at = self.scores.pop(caller, (0.0, now))
        score = score * math.exp((at - now) / TIME_CONSTANT_S) + 1.0
        self.scores[caller] = (score, now)
        if len(self.scores) > self.config.max_callers:
            self.scores.popitem(last=False)  # the least recently refused caller
        if (score <= self.threshold or self.held >= self.config.max_held
                or self.held_by.get(caller, 0) >= self.config.max_held_per_caller):
            return 0.0
        return min(self.config.max_delay_s, self.config.base_delay_s * score / self.threshold)

    def flooding_callers(self) -> int:
        """Callers whose score, decayed to now, is above the threshold (their next refusal is held)."""
        now = self.clock()
        return sum(score * math.exp((at - now) / TIME_CONSTANT_S) > self.threshold
                   for score, at in self.scores.values())

    async def hold(self, caller: str) -> float:
        """Count one refusal of `caller` and sleep as long as it deserves; returns the seconds held."""
        seconds = self.delay(caller)
        if seconds:
            self.held += 1
            self.held_total += 1
            self.held_by[caller] = self.held_by.get(caller, 0) + 1
            try:
                await asyncio.sleep(seconds)
            finally:
                self.held -= 1
                self.held_by[caller] -= 1
                if not self.held_by[caller]:
                    del self.held_by[caller]
        return seconds


def backoff_metadata(seconds: float) -> tuple[tuple[str, str], ...]:
    """Trailing metadata of a held refusal: wait at least `seconds` before the next call."""
    return (("retry-after", str(max(1, math.ceil(seconds)))),
            ("grpc-retry-pushback-ms", str(max(1, round(1000 * seconds)))))
