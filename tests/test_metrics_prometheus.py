"""Every service's --metrics-port scraped by a real Prometheus (Debian's `prometheus`, on
loopback): one series of each kind is queried through Prometheus' HTTP API, with exact values
where they are known (tokens generated, expert token rows). The router logs JSON lines
(--log-format json) with request ids."""

import json
import re
import shutil
import time

import pytest

from shardmesh.client import Client
from shardmesh.config import ModelConfig
from shardmesh.launcher import Launcher

from mesh_helpers import topology
from prometheus_server import PrometheusServer

pytestmark = pytest.mark.slow
PROMPT, MAX_NEW_TOKENS, REQUESTS = [1, 5, 9], 4, 2
METRICS_LINE = re.compile(r"metrics at http://([\d.]+:\d+)/metrics")


def metrics_addresses(launcher: Launcher, timeout: float = 30.0) -> dict[str, str]:
    """Each service's metrics host:port, from the line its process logs once serving them."""
    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    while len(found) < len(launcher.processes):
        for name in launcher.processes:
            match = METRICS_LINE.search(launcher.log_tail(name, lines=200))
            if match:
                found[name] = match.group(1)
        assert time.monotonic() < deadline, f"metrics ports logged by {sorted(found)} of {sorted(launcher.processes)}"
        time.sleep(0.1)
    return found


def value(result: list[dict]) -> float:
    return sum(float(sample["value"][1]) for sample in result)


def test_prometheus_scrapes_every_service(mixtral_dir, tmp_path):
    assert shutil.which("prometheus"), "Debian's prometheus is missing: scripts/setup.sh installs it"
    config = ModelConfig.from_dir(mixtral_dir)
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(topology([(0, 2), (2, 4)], [[0, 1, 2, 3], [4, 5, 6, 7]]).to_toml())
    metrics_args = ["--metrics-port", "0"]
    prometheus = None
    service_args = {"router": [*metrics_args, "--log-format", "json"], "stage": metrics_args, "expert": metrics_args}
    with Launcher(mixtral_dir, topology_file, log_level="INFO", no_auth=True, service_args=service_args) as launcher:
        try:
            address = launcher.router_address  # started and SERVING on entering
            targets = metrics_addresses(launcher)
            prometheus = PrometheusServer(sorted(targets.values()))
            with Client(address, timeout=60) as client:
                for _ in range(REQUESTS):
                    assert len(client.generate_all(PROMPT, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True).tokens) \
                        == MAX_NEW_TOKENS
            generated = REQUESTS * MAX_NEW_TOKENS
            up = prometheus.wait_for(f'count(up == 1) == {len(targets)}')  # every service scraped
            assert up
            # latency (router), tokens/s counter
            ttft = prometheus.wait_for(f'shardmesh_time_to_first_token_seconds_count{{server="router"}} == {REQUESTS}')
            assert value(ttft) == REQUESTS
            tpot = prometheus.wait_for('shardmesh_time_per_output_token_seconds_count{server="router"}')
            assert value(tpot) == REQUESTS * (MAX_NEW_TOKENS - 1)
            assert value(prometheus.wait_for(f'shardmesh_output_tokens_total == {generated}')) == generated
            # queue depth (nothing waits now), batch size
            assert value(prometheus.wait_for('shardmesh_queue_depth{server="router"}')) == 0
            steps = prometheus.wait_for('shardmesh_batch_sequences_count{server="router"}')
            assert value(steps) >= generated
            # KV cache use on every stage (finished requests are freed: 0 cached)
            for stage in ("stage-0", "stage-1"):
                assert value(prometheus.wait_for(f'shardmesh_kv_cached_tokens{{server="{stage}"}}')) == 0
                assert prometheus.wait_for(f'shardmesh_kv_cached_sequences{{server="{stage}"}}')
            # per-expert token rows: every fed token (prompt + all but the last generated) in every
            # layer picks top-k experts
            fed = REQUESTS * (len(PROMPT) + MAX_NEW_TOKENS - 1)
            rows = fed * config.num_layers * config.experts_per_token
            assert value(prometheus.wait_for(f'sum(shardmesh_expert_tokens_total) == {rows}')) == rows
            layer0 = prometheus.wait_for('shardmesh_expert_tokens_total{layer="0"}')
            assert {s["metric"]["server"] for s in layer0} <= {"experts-0", "experts-1"}
            for server in ("experts-0", "experts-1"):
                assert value(prometheus.wait_for(f'shardmesh_expert_busy_seconds_total{{server="{server}"}} > 0')) > 0
            # data plane: bytes and latency of router->stage steps and stage->expert calls
            for edge, server in (("router_stage", "router"), ("stage_expert", "stage-0")):
                selector = f'edge="{edge}",server="{server}"'
                sent = f'shardmesh_data_plane_bytes_total{{{selector},direction="sent"}}'
                assert value(prometheus.wait_for(f'{sent} > 0')) > 0
                assert value(prometheus.wait_for(f'shardmesh_data_plane_call_seconds_count{{{selector}}} > 0')) > 0
            # the router's JSON lines: one "request finished" per request, each with its request id
            lines = [json.loads(line) for line in launcher.log_tail("router", 100_000).splitlines()
                     if line.startswith("{")]
            ended = [line for line in lines if line["message"].startswith("request finished")]
            assert len({line["request_id"] for line in ended}) == len(ended) == REQUESTS
            assert all(line["service"] == "router" for line in lines)
        finally:
            if prometheus is not None:
                prometheus.stop()
