"""Logging of a service: plain text (default) or JSON lines (`--log-format json`), each record
carrying the request id (the router's sequence id) of the request it concerns, when known."""

import contextvars
import json
import logging
import time

from shardmesh.telemetry import tracing

request_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("shardmesh_request_id", default=None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, service, logger, message, and
    request_id / trace_id when the record concerns a request (exception text under `exception`)."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "service": self.service, "logger": record.name,
                 "message": record.getMessage()}
        for key in ("request_id", "trace_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _RequestContext(logging.Filter):
    """Adds request_id (from the context variable) and, when tracing, the current trace id,
    unless the call gave them in `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        if getattr(record, "trace_id", None) is None:
            record.trace_id = tracing.current_trace_id()
        return True


def configure(service: str, level: str, log_format: str = "text") -> None:
    """Set up the root logger of a service process (as logging.basicConfig: nothing changes when
    the root logger already has handlers, e.g. under pytest)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(name)s %(levelname)s %(message)s"))
    handler.addFilter(_RequestContext())
    logging.basicConfig(level=level, handlers=[handler])
