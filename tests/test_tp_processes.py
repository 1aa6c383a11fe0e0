"""Tensor-parallel stages as real processes, as users run them: `shardmesh up` (the Launcher) on a
topology with tp = 2 serves transformers' greedy tokens; a shard server killed with SIGKILL (and
not started again: tests/test_tp_reform_processes.py), or never started, leaves its stage
NOT_SERVING with the reason and requests fail with UNAVAILABLE within their deadline, never a hang.

Bounds are generous for a loaded 2-core CI machine (load average ~10): startup waits on
grpc.health.v1 / the router's status with a 300 s cap (a process imports torch in seconds when
idle, much longer under load); every loop polls with a deadline; what a test started is killed,
by pid, in a finally block."""

import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oracle import reference_greedy
from shardmesh.client import Client, UnavailableError
from shardmesh.launcher import Launcher
from shardmesh.topology import StageSpec, Topology
from shardmesh.tp_group import free_port
from shardmesh.v1 import router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc

pytestmark = pytest.mark.slow
STARTUP_S = 300.0  # cap, not a sleep: every wait returns as soon as its condition holds
PROMPT = [5, 17, 99, 3]


def stage_state(address: str) -> tuple[int, str]:
    """(grpc.health.v1 status, StageInfo.not_serving_reason) of the stage server at `address`."""
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        info = stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
    return status, info.not_serving_reason


def wait_for(condition, timeout: float, what: str):
    """Poll `condition()` (returns a truthy value when done; may raise grpc.RpcError meanwhile)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except grpc.RpcError as error:
            last = error
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s (last error: {last})")


def test_shardmesh_up_with_tp_generates_the_reference_then_a_killed_shard_fails_requests(llama_dir, tmp_path):
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(Topology((StageSpec("stage-0", 0, 4, 2),)).to_toml())
    assert "tp = 2" in topology_file.read_text()
    expected = reference_greedy(llama_dir, PROMPT, 4)[0]
    launcher = Launcher(llama_dir, topology_file, no_auth=True, ready_timeout=STARTUP_S,
                        service_args={"stage": ["--tp-collective-timeout", "300"]})
    with launcher:
        # Both shards with --tp-rank auto: the router gives ranks in arrival order.
        assert sorted(launcher.processes) == ["router", "stage-0/shard-0", "stage-0/shard-1"]
        with Client(launcher.router_address, timeout=120) as client:
            tokens = [t.token_id for t in client.generate_all(PROMPT, max_new_tokens=4, ignore_eos=True).tokens]
        assert tokens == expected
        with grpc.insecure_channel(launcher.router_address) as channel:
            status = router_pb2_grpc.RouterStub(channel).GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=10)
        [stage] = status.servers
        assert sorted(s.shard_id for s in stage.tp_shards) == ["stage-0/shard-0", "stage-0/shard-1"]
        rank1 = launcher.processes[next(s.shard_id for s in stage.tp_shards if s.rank == 1)]
        assert stage_state(stage.address) == (health_pb2.HealthCheckResponse.SERVING, "")

        rank1.kill()  # SIGKILL, by the pid the launcher started; not restarted
        rank1.wait(timeout=30)
        started = time.monotonic()
        with Client(launcher.router_address, timeout=120) as client:
            with pytest.raises(UnavailableError):
                client.generate_all(PROMPT, max_new_tokens=4, ignore_eos=True)
        # Not the 300 s collective timeout: the router waits for the group to re-form while the dead
        # rank's lease runs (30 s after its last ask: router/failover.py TP_HEARD_S), then fails the
        # request; 90 s: a loaded machine.
        assert time.monotonic() - started < 90
        status, reason = wait_for(lambda: (s := stage_state(stage.address))[0] != health_pb2.HealthCheckResponse.SERVING
                                  and s, 30, "stage-0 NOT_SERVING")
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING and "shard" in reason, reason


def test_a_shard_never_started_leaves_the_stage_not_serving_and_requests_unavailable(llama_dir, tmp_path):
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(Topology((StageSpec("stage-0", 0, 4, 2),)).to_toml())
    port_file = tmp_path / "router.port"
    common = ["--model", str(llama_dir), "--topology", str(topology_file), "--no-auth", "--log-level", "WARNING"]
    stage_address = f"127.0.0.1:{free_port()}"
    processes: list[subprocess.Popen] = []
    try:
        processes.append(subprocess.Popen([sys.executable, "-m", "shardmesh.cli", "router", *common,
                                           "--port-file", str(port_file)], stdin=subprocess.DEVNULL))
        wait_for(port_file.exists, STARTUP_S, "the router's port file")
        router = f"127.0.0.1:{int(port_file.read_text())}"
        processes.append(subprocess.Popen([  # rank 0 only: "stage-0/tp1" is never started
            sys.executable, "-m", "shardmesh.cli", "stage", *common, "--name", "stage-0", "--router", router,
            "--port", stage_address.rsplit(":", 1)[1], "--tp-rendezvous", f"127.0.0.1:{free_port()}",
            "--tp-join-timeout", "3", "--tp-collective-timeout", "300"], stdin=subprocess.DEVNULL))
        wait_for(lambda: stage_state(stage_address), STARTUP_S, "stage-0 listening")
        listening = time.monotonic()
        status, reason = wait_for(lambda: (s := stage_state(stage_address))[1] and s, 60, "a not-serving reason")
        # Within the 3 s join timeout (the server listens just before joining); 30 s: a loaded machine.
        assert time.monotonic() - listening < 30
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "could not join the group" in reason and "within 3.0 s" in reason, reason
        started = time.monotonic()
        with Client(router, timeout=30) as client:
            with pytest.raises(UnavailableError, match="stage-0"):
                client.generate_all(PROMPT, max_new_tokens=2)
        assert time.monotonic() - started < 30
        assert all(p.poll() is None for p in processes), "no process may exit"
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)
