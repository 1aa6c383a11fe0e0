"""`shardmesh health`: exit 0 only on SERVING, 1 on anything else; never imports torch."""

import concurrent.futures
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardmesh.cli_health import check

NO_TORCH = r'''
import sys


class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "numpy", "safetensors", "transformers"}:
            raise ImportError(f"{name} must not be imported by `shardmesh health`")
        return None


sys.meta_path.insert(0, BlockTorch())
from shardmesh.cli import main
sys.exit(main(["health", *sys.argv[1:]]))
'''


@pytest.fixture
def health_server():
    """A loopback server whose "" status is SERVING and "shardmesh.v1.Stage" NOT_SERVING."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("shardmesh.v1.Stage", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def closed_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_check_answers(health_server):
    assert check(health_server) == (True, "SERVING")
    assert check(health_server, "shardmesh.v1.Stage") == (False, "NOT_SERVING")
    serving, said = check(health_server, "no.such.Service")
    assert not serving and said.startswith("NOT_FOUND")
    serving, said = check(f"127.0.0.1:{closed_port()}", timeout=2)
    assert not serving and said.startswith("UNAVAILABLE")


def test_command_exit_codes_without_torch(health_server):
    def run(*args):
        return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=30)

    ok = run("--address", health_server)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{health_server}: SERVING", ok.stderr
    not_serving = run("--address", health_server, "--service", "shardmesh.v1.Stage")
    assert not_serving.returncode == 1 and "NOT_SERVING" in not_serving.stdout, not_serving.stderr
    unreachable = run("--address", f"127.0.0.1:{closed_port()}", "--timeout", "2")
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stdout, unreachable.stderr
