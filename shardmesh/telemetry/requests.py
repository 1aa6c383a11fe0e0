"""The router's view of one Generate request: latency metrics, its trace, its log lines."""

import logging
import time

from shardmesh.telemetry import logs, metrics, tracing

log = logging.getLogger("shardmesh.requests")
# The router's series, labelled once (labels() per token would take a lock and hash each time).
_FIRST_TOKEN = metrics.TIME_TO_FIRST_TOKEN.labels("router")
_PER_TOKEN = metrics.TIME_PER_OUTPUT_TOKEN.labels("router")
_TOKENS = metrics.OUTPUT_TOKENS.labels("router")


class RequestTelemetry:
    """Created when a request is admitted; `token()` at each token streamed, `finish()` once."""

    __slots__ = ("sequence_id", "arrived", "last", "tokens", "trace", "_token_id")

    def __init__(self, sequence_id: int, grpc_context):
        self.sequence_id = sequence_id
        self.arrived = self.last = time.perf_counter()
        self.tokens = 0
        self.trace = tracing.start_request(sequence_id, grpc_context)  # None when tracing is off
        self._token_id = logs.request_id.set(sequence_id)  # log lines of this request carry its id
        log.debug("request admitted")

    def token(self) -> None:
        now = time.perf_counter()
        if self.tokens == 0:
            _FIRST_TOKEN.observe(now - self.arrived)
        else:
            _PER_TOKEN.observe(now - self.last)
        _TOKENS.inc()
        self.tokens += 1
        self.last = now

    def finish(self, outcome: str) -> None:
        """outcome: "length" | "stop" | "cancelled" | an error's status code name."""
        log.info("request finished: %s, %d tokens in %.3f s", outcome, self.tokens, time.perf_counter() - self.arrived,
                 extra={"trace_id": self.trace.trace_id} if self.trace is not None else None)
        if self.trace is not None:
            self.trace.finish(outcome, self.tokens)
        try:
            logs.request_id.reset(self._token_id)
        except ValueError:  # finished from another context (a cancelled stream): nothing to restore
            pass
