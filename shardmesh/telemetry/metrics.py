"""Prometheus metrics of one process (one service, or a whole in-process mesh: every series has a
`server` label, the topology name of the service that counts it).

Event metrics (histograms, counters) are recorded by hooks as things happen; state metrics (queue
depth, KV cache use, per-expert tokens and busy time) are read when Prometheus scrapes, from the
objects that already count them (the scheduler, the KV cache, expert_server.load.ExpertLoadMeter),
so nothing is counted twice. `serve` exposes them in the text format over HTTP (`--metrics-port`)."""

import collections
import time
import weakref

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)


class _RecordCalls:
    """Registered first, so a scrape collects it before the families: it records data_plane_call's
    calls not recorded yet (a scrape runs on the HTTP server's thread: the deque is shared safely)."""

    def describe(self):
        return []

    def collect(self):
        _record_calls()
        return []


REGISTRY.register(_RecordCalls())
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

TIME_TO_FIRST_TOKEN = Histogram("shardmesh_time_to_first_token_seconds",
                                "From a Generate request's arrival to its first token", ["server"],
                                buckets=LATENCY_BUCKETS, registry=REGISTRY)
TIME_PER_OUTPUT_TOKEN = Histogram("shardmesh_time_per_output_token_seconds",
                                  "Between consecutive tokens of one request", ["server"],
                                  buckets=LATENCY_BUCKETS, registry=REGISTRY)
OUTPUT_TOKENS = Counter("shardmesh_output_tokens", "Tokens generated (rate() = tokens/s)", ["server"],
                        registry=REGISTRY)
BATCH_SEQUENCES = Histogram("shardmesh_batch_sequences", "Sequences in one pipeline step", ["server"],
                            buckets=SIZE_BUCKETS, registry=REGISTRY)
BATCH_TOKENS = Histogram("shardmesh_batch_tokens", "Tokens (prompt chunks + decodes) in one pipeline step",
                         ["server"], buckets=SIZE_BUCKETS, registry=REGISTRY)
# edge: "router_stage" (one step through one stage) or "stage_expert" (one ComputeExperts call).
DATA_PLANE_SECONDS = Histogram("shardmesh_data_plane_call_seconds",
                               "One call on a data plane edge, request sent to answer decoded",
                               ["server", "edge", "peer"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
DATA_PLANE_BYTES = Counter("shardmesh_data_plane_bytes", "Tensor bytes on a data plane edge",
                           ["server", "edge", "peer", "direction"], registry=REGISTRY)


def tensor_bytes(payload) -> int:
    """Bytes of a torch tensor or of a wire Tensor (shardmesh.v1.Tensor)."""
    data = getattr(payload, "data", None)
    if isinstance(data, bytes):
        return len(data)
    return payload.numel() * payload.element_size()


_EDGES: dict[tuple[str, str, str], tuple] = {}  # (server, edge, peer) -> its three series (labels() once)
# data_plane_call's calls not recorded yet: (series, seconds, sent bytes, received bytes). Recorded in
# batches of RECORD_CALLS (a call's own part is one append: each of the three series' updates takes a
# lock, on the cold caches of a decode step's hops) and by every scrape, before it reads the families.
_PENDING_CALLS: collections.deque = collections.deque()
RECORD_CALLS = 64


def data_plane_call(server: str, edge: str, peer: str, started: float, sent_bytes: int, received_bytes: int) -> None:
    """Record one call that began at `started` (time.perf_counter()) and has just been answered (in
    the metrics by the next scrape at the latest)."""
    series = _EDGES.get((server, edge, peer))
    if series is None:  # a new edge: look its labelled series up once (labels() takes a lock and hashes)
        series = _EDGES[server, edge, peer] = (DATA_PLANE_SECONDS.labels(server, edge, peer),
                                               DATA_PLANE_BYTES.labels(server, edge, peer, "sent"),
                                               DATA_PLANE_BYTES.labels(server, edge, peer, "received"))
    pending = _PENDING_CALLS
    pending.append((series, time.perf_counter() - started, sent_bytes, received_bytes))
    if len(pending) >= RECORD_CALLS:
        _record_calls()


def _record_calls() -> None:
    pending = _PENDING_CALLS
    while pending:
        try:
            (seconds, sent, received), elapsed, sent_bytes, received_bytes = pending.popleft()
        except IndexError:  # a scrape took the last one meanwhile
            return
        seconds.observe(elapsed)
        sent.inc(sent_bytes)
        received.inc(received_bytes)


class _StateCollector:
    """Reads state metrics from the services' own objects at scrape time (held weakly: a stopped
    service disappears from the metrics and is not kept alive by them)."""

    def __init__(self):
        self.sources: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # object -> (server, read)

    def describe(self):
        return []  # families depend on which services run here

    def collect(self):
        families = {}
        for owner, (server, read) in list(self.sources.items()):
            for kind, name, documentation, labels, value in read(owner):
                if name not in families:
                    family_type = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                    families[name] = family_type(name, documentation, labels=["server", *labels])
                families[name].add_metric([server, *labels.values()], value)
        return list(families.values())


_STATE = _StateCollector()
REGISTRY.register(_STATE)


def _router_state(state):
    scheduler = state.scheduler
    yield "gauge", "shardmesh_queue_depth", "Requests waiting for a batch slot", {}, len(scheduler.waiting)
    yield "gauge", "shardmesh_running_sequences", "Sequences in the running batch", {}, len(scheduler.running)
    pit = getattr(state, "tarpit", None)  # router/tarpit.py, unless --tarpit-refusals-per-second 0
    if pit is not None:
        yield "counter", "shardmesh_tarpit_refusals", "Refusals the tarpit counted (admission, per-caller limit)", \
            {}, pit.refusals_total
        yield "counter", "shardmesh_tarpit_held_refusals", "Refusals held before they were answered", {}, pit.held_total
        yield "gauge", "shardmesh_tarpit_held_calls", "Refusals being held now", {}, pit.held
        yield "gauge", "shardmesh_tarpit_flooding_callers", "Callers refused faster than the threshold now", {}, \
            pit.flooding_callers()


def _stage_state(model):
    yield "gauge", "shardmesh_kv_cached_sequences", "Sequences with KV cache on this stage", {}, \
        len(model.cache.sequence_ids())
    yield "gauge", "shardmesh_kv_cached_tokens", "Tokens in this stage's KV cache", {}, model.cache.cached_tokens()


def _expert_state(meter):
    for (layer, expert), tokens in sorted(meter.total_tokens.items()):
        yield "counter", "shardmesh_expert_tokens", "Token rows computed per expert", \
            {"layer": str(layer), "expert": str(expert)}, tokens
    yield "counter", "shardmesh_expert_busy_seconds", "Seconds this replica spent computing experts", {}, \
        meter.total_busy_s


def watch_router(state) -> None:
    """The router's queue depth and running batch (state: router.main.RouterState)."""
    _STATE.sources[state] = ("router", _router_state)


def watch_stage(name: str, model) -> None:
    """A stage's KV cache use (model: shardmesh.stage_model.StageModel)."""
    _STATE.sources[model] = (name, _stage_state)


def watch_expert(name: str, meter) -> None:
    """An expert server's per-expert tokens and busy time (meter: expert_server.load.ExpertLoadMeter)."""
    _STATE.sources[meter] = (name, _expert_state)


def serve(host: str, port: int):
    """Expose this process's metrics at http://host:port/metrics (port 0 = the OS chooses) on a
    daemon thread; returns the HTTP server (`.server_port`; `.shutdown()` stops it)."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server
