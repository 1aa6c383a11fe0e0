"""metrics.data_plane_call (shardmesh/telemetry/metrics.py): a call is one append; the series are
updated in batches of RECORD_CALLS, and any scrape sees every call made before it."""

import time

from prometheus_client import generate_latest

from shardmesh.telemetry import metrics


def _count(peer: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("shardmesh_data_plane_call_seconds_count",
                                             {"server": "s", "edge": "stage_expert", "peer": peer})


def test_calls_are_recorded_in_batches_and_every_scrape_sees_them_all():
    peer = f"test-{time.monotonic_ns()}"
    started = time.perf_counter()
    metrics.data_plane_call("s", "stage_expert", peer, started, 100, 40)
    sent_series = metrics.DATA_PLANE_BYTES.labels("s", "stage_expert", peer, "sent")
    assert sent_series._value.get() == 0  # not per call
    assert _count(peer) == 1  # a scrape records what is pending first
    sent = metrics.REGISTRY.get_sample_value("shardmesh_data_plane_bytes_total", {
        "server": "s", "edge": "stage_expert", "peer": peer, "direction": "sent"})
    assert sent == 100
    for _ in range(metrics.RECORD_CALLS):
        metrics.data_plane_call("s", "stage_expert", peer, started, 1, 1)
    assert sent_series._value.get() >= 100 + metrics.RECORD_CALLS - 1  # a full batch: recorded by the call filling it
    metrics.data_plane_call("s", "stage_expert", peer, started, 1, 1)
    text = generate_latest(metrics.REGISTRY).decode()  # what the HTTP server sends
    line = next(line for line in text.splitlines()
                if line.startswith("shardmesh_data_plane_call_seconds_count") and peer in line)
    assert float(line.split()[-1]) == metrics.RECORD_CALLS + 2
