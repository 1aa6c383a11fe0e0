"""A tensor-parallel group formed through the control plane, as real processes: a router and two
stage processes started with `--tp-rank auto` (no rank, no rendezvous on their command lines).
The router gives each its rank and rank 0's rendezvous; the stage registers once its group has
formed and the mesh serves transformers' greedy tokens; GetClusterStatus shows the ranks. Then
rank 1 freezes (SIGSTOP) and a request fails UNAVAILABLE once rank 1's lease has run out (the group
could re-form until then: tests/test_tp_reform_processes.py), not at the collective timeout.

Bounds are generous for a loaded 2-core CI machine (load average ~10): startup waits on the
router's status with a 300 s cap (a process imports torch in seconds when idle, much longer
under load); every loop polls with a deadline; what the test started is killed, by pid, in a
finally block."""

import signal
import subprocess
import sys
import time

import grpc
import pytest

from oracle import reference_greedy
from grpc_health.v1 import health_pb2
from shardmesh.cli_status import render
from shardmesh.client import Client, UnavailableError
from shardmesh.topology import StageSpec, Topology
from shardmesh.v1 import router_pb2, router_pb2_grpc
from test_tp_processes import PROMPT, STARTUP_S, stage_state, wait_for

pytestmark = pytest.mark.slow


def cluster_status(router: str) -> router_pb2.ClusterStatus:
    with grpc.insecure_channel(router) as channel:
        return router_pb2_grpc.RouterStub(channel).GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=10)


def test_shards_started_without_ranks_get_them_from_the_router_and_serve_the_reference(llama_dir, tmp_path):
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(Topology((StageSpec("stage-0", 0, 4, 2),)).to_toml())
    port_file = tmp_path / "router.port"
    common = ["--model", str(llama_dir), "--topology", str(topology_file), "--no-auth", "--log-level", "INFO"]
    expected = reference_greedy(llama_dir, PROMPT, 4)[0]
    processes: list[subprocess.Popen] = []
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("router", "a", "b")}
    try:
        processes.append(subprocess.Popen([sys.executable, "-m", "shardmesh.cli", "router", *common,
                                           "--port-file", str(port_file)], stdin=subprocess.DEVNULL,
                                          stdout=logs["router"], stderr=subprocess.STDOUT))
        wait_for(port_file.exists, STARTUP_S, "the router's port file")
        router = f"127.0.0.1:{int(port_file.read_text())}"
        for shard_id in ("a", "b"):  # the same command line but for the id: as replicas of one service
            processes.append(subprocess.Popen([
                sys.executable, "-m", "shardmesh.cli", "stage", *common, "--name", "stage-0", "--tp-rank", "auto",
                "--tp-shard-id", shard_id, "--router", router, "--tp-collective-timeout", "300"],
                stdin=subprocess.DEVNULL, stdout=logs[shard_id], stderr=subprocess.STDOUT))
        try:
            status = wait_for(lambda: (s := cluster_status(router)).serving and s, STARTUP_S, "the mesh SERVING")
        except AssertionError:
            for name in logs:
                print(name, (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:])
            raise
        [stage] = status.servers
        assert sorted((s.rank, s.shard_id) for s in stage.tp_shards) in ([(0, "a"), (1, "b")], [(0, "b"), (1, "a")])
        rank0 = next(s.shard_id for s in stage.tp_shards if s.rank == 0)
        assert f"rank 0: {rank0} (generation 1)" in render(status)  # `shardmesh status` shows the group's generation
        assert "tensor-parallel group formed at 127.0.0.1:" in (tmp_path / f"{rank0}.log").read_text(errors="replace")
        with Client(router, timeout=120) as client:
            tokens = [t.token_id for t in client.generate_all(PROMPT, max_new_tokens=4, ignore_eos=True).tokens]
        assert tokens == expected
        assert all(p.poll() is None for p in processes), "no process may exit"

        # Rank 1 freezes: rank 0's step stream to it fails its keepalive within ~3 s, not at the 300 s
        # collective timeout; rank 0 reports NOT_SERVING with the reason and re-forms a new generation,
        # which rank 1 cannot join. The router waits for that while rank 1's lease runs (30 s after its
        # last ask: router/failover.py TP_HEARD_S), then fails the request.
        rank1 = next(s.shard_id for s in stage.tp_shards if s.rank == 1)
        frozen = processes[1 + ["a", "b"].index(rank1)]
        frozen.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with Client(router, timeout=120) as client:
            with pytest.raises(UnavailableError):
                client.generate_all(PROMPT, max_new_tokens=4, ignore_eos=True)
        failed_s = time.monotonic() - started
        assert 20 < failed_s < 90, failed_s  # ~30 s idle; 90 s: a loaded machine, and far below 300 s
        status, reason = wait_for(lambda: (s := stage_state(stage.address))[0] != health_pb2.HealthCheckResponse.SERVING
                                  and s, 60, "stage-0 NOT_SERVING")
        assert "shard 127.0.0.1:" in reason and "ping timeout" in reason, reason  # idle or mid-step
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)
        for log in logs.values():
            log.close()
