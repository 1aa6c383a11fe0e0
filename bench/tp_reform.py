"""How long a tensor-parallel stage takes to serve again after one shard is killed and started
again under its --tp-shard-id (the group re-forms: stage_server/tp_membership.py), against the
baseline of the same stage's cold start, measured in the same run.

    .venv/bin/python bench/tp_reform.py [--rounds 3] [--hidden 256] [--layers 2]

A router and two `shardmesh stage --tp-rank auto` processes (one tp = 2 stage, a seeded dense
Llama); this process polls the router's GetClusterStatus every 20 ms. Cold start: both shards
spawned -> the router serves the stage. Each round kills rank 1 (SIGKILL), spawns it again, and
times (a) spawn -> its first ask to the router (the process's start: imports, loading), (b) that
ask -> the stage serving in a new generation (the re-form proper), (c) spawn -> serving; then the
same for rank 0. Prints medians and (c) / cold start. Not a test.
"""

import argparse
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.tp_decode_step import make_model  # noqa: E402
from shardmesh.topology import StageSpec, Topology  # noqa: E402
from shardmesh.v1 import router_pb2, router_pb2_grpc  # noqa: E402


def status(router) -> router_pb2.ClusterStatus | None:
    try:
        return router.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
    except grpc.RpcError:
        return None


def poll(condition, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise TimeoutError("not within the bound")


def serving_after(router, generation: int):
    """The stage's ServerStatus once served with both shards in a generation > `generation`."""
    def check():
        current = status(router)
        if current is None or not current.serving:
            return None
        [stage] = current.servers
        generations = {s.generation for s in stage.tp_shards}
        if len(stage.tp_shards) != 2 or len(generations) != 1 or min(generations) <= generation:
            return None  # a shard says the generation it is joining: the stage's health says it formed
        with grpc.insecure_channel(stage.address) as channel:
            try:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError:
                return None
        return stage if health.status == health_pb2.HealthCheckResponse.SERVING else None
    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--log-dir", default="", help="the services' logs (INFO) go to files here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(tmp, args.hidden, args.layers)
        topology = pathlib.Path(tmp) / "topology.toml"
        topology.write_text(Topology((StageSpec("stage-0", 0, args.layers, 2),)).to_toml())
        common = ["--model", model_dir, "--topology", str(topology), "--no-auth",
                  "--log-level", "INFO" if args.log_dir else "WARNING"]
        port_file = pathlib.Path(tmp) / "router.port"
        processes: dict[str, subprocess.Popen] = {}

        def output(name: str):
            return open(pathlib.Path(args.log_dir) / f"{name}.log", "ab") if args.log_dir else None

        def spawn(shard_id: str) -> float:
            processes[shard_id] = subprocess.Popen(
                [sys.executable, "-m", "shardmesh.cli", "stage", *common, "--name", "stage-0", "--tp-rank", "auto",
                 "--tp-shard-id", shard_id, "--router", address, "--threads", "1"], stdin=subprocess.DEVNULL,
                stdout=output(shard_id), stderr=subprocess.STDOUT)
            return time.monotonic()
        try:
            processes["router"] = subprocess.Popen([sys.executable, "-m", "shardmesh.cli", "router", *common,
                                                    "--port-file", str(port_file)], stdin=subprocess.DEVNULL,
                                                   stdout=output("router"), stderr=subprocess.STDOUT)
            [port] = harness.wait_for_ports([port_file], [processes["router"]], "the router")
            address = f"127.0.0.1:{port}"
            with grpc.insecure_channel(address) as channel:
                router = router_pb2_grpc.RouterStub(channel)
                started = min(spawn("a"), spawn("b"))
                stage = poll(serving_after(router, 0))
                cold_s = time.monotonic() - started
                rows = {1: [], 0: []}
                for _ in range(args.rounds):
                    for rank in (1, 0):
                        victim = next(s.shard_id for s in stage.tp_shards if s.rank == rank)
                        generation = stage.tp_shards[0].generation
                        processes[victim].kill()
                        processes[victim].wait()
                        spawned = spawn(victim)

                        def asked():
                            current = status(router)
                            held = [s for s in current.servers[0].tp_shards if s.rank == rank] if current else []
                            return bool(held) and held[0].seconds_since_heard < time.monotonic() - spawned
                        poll(asked)
                        first_ask = time.monotonic()
                        stage = poll(serving_after(router, generation))
                        done = time.monotonic()
                        rows[rank].append((first_ask - spawned, done - first_ask, done - spawned))
        finally:
            for process in processes.values():
                process.send_signal(signal.SIGKILL)
                process.wait()
    print(f"load average {os.getloadavg()[0]:.2f}; cold start of the stage (both shards spawned -> serving): "
          f"{cold_s:.2f} s")
    for rank, figures in rows.items():
        start, reform, total = (statistics.median(f[i] for f in figures) for i in range(3))
        print(f"rank {rank} killed and restarted ({len(figures)} rounds, medians): spawn -> first ask {start:.2f} s, "
              f"first ask -> serving again {reform:.2f} s, spawn -> serving {total:.2f} s = {total / cold_s:.2f} x "
              f"the cold start; each round: " + ", ".join(f"{f[1]:.2f}/{f[2]:.2f}" for f in figures))


if __name__ == "__main__":
    main()
