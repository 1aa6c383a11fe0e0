"""Server CPU per refused Generate: what refusing one request under overload costs the router's
process, against grpc.aio's own floor measured in the same run.

    .venv/bin/python bench/refusal_cost.py [--calls 4000] [--concurrency 8] [--repeats 5]

Each configuration runs as a server process of its own whose admission queue is always full;
a client process sends `--calls` Generate calls (`--concurrency` at a time) and the server's CPU
time (user + system, /proc/PID/stat) is divided by the calls. Configurations:
  grpc floor     a bare grpc.aio unary-stream handler that sets RESOURCE_EXHAUSTED (no interceptors)
  floor, no recv the same served as stream-stream: grpc.aio does not receive the request
  servicer       the router's servicer check (request guard, parse, servicer, abort): the first path
  gate, unary    router.admission.AdmissionGate refusing with a unary-stream handler (before)
  gate           router.admission.AdmissionGate as it is (stream-stream: the request is not received)
  gate + tokens  the same behind the bearer-token check
  router server  gate + tokens on a server with every service the router serves (Router, Registry,
                 Admin, health, reflection), as router/main.py builds it
Not a test; the client shares the machine's cores with the server, so only ratios in one run mean much.
"""

import argparse
import asyncio
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
MODES = ["grpc floor", "floor, no recv", "servicer", "gate, unary", "gate", "gate + tokens", "router server"]
GENERATE = "/shardmesh.v1.Router/Generate"


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class FullRouter:
    """What the refusal paths read of router.main.RouterState: always full."""
    max_queued = 0

    def admission_full(self) -> bool:
        return True


async def serve(mode: str, port_file: str) -> None:
    from router.admin import AdminServicer
    from router.admission import AdmissionGate, refusal_details
    from router.main import SERVICE_NAMES
    from router.servicer import RegistryServicer, RouterServicer
    from shardmesh import grpc_util
    from shardmesh.security import Security
    from shardmesh.v1 import admin_pb2_grpc, router_pb2_grpc
    state = FullRouter()
    if mode in ("grpc floor", "floor, no recv"):
        async def refuse(request, context):
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        kind = grpc.unary_stream_rpc_method_handler if mode == "grpc floor" else grpc.stream_stream_rpc_method_handler
        handler = kind(refuse)

        class Generic(grpc.GenericRpcHandler):
            def service(self, details):
                return handler
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([Generic()])
    elif mode == "servicer":
        server = grpc_util.new_server(None)
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(state), server)
    else:
        tokens = mode in ("gate + tokens", "router server")
        security = Security(client_token="bench", internal_token="bench-internal") if tokens else None
        gate = AdmissionGate(state)
        if mode == "gate, unary":  # the gate's refusal as it was: a unary-stream handler
            async def refuse(request, context):
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(refusal_details(state.max_queued))
            gate._refusal = grpc.unary_stream_rpc_method_handler(refuse)
        server = grpc_util.new_server(security, interceptors=[gate])
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(state), server)
        if mode == "router server":
            router_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(state), server)
            admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(state), server)
            grpc_util.add_health_and_reflection(server, SERVICE_NAMES)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pathlib.Path(port_file).write_text(str(port))
    await server.wait_for_termination()


async def flood(port: int, calls: int, concurrency: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        generate = channel.unary_stream(GENERATE)

        async def loop(count: int):
            for _ in range(count):
                try:
                    async for _ in generate(b"", metadata=(("authorization", "Bearer bench"),), timeout=10):
                        pass
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        await asyncio.gather(*(loop(calls // concurrency) for _ in range(concurrency)))


def measure(mode: str, calls: int, concurrency: int) -> tuple[float, float]:
    """(server, client) CPU microseconds per refused call."""
    with tempfile.TemporaryDirectory() as workdir:
        port_file = pathlib.Path(workdir) / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(port_file)])
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{mode}: the server did not start")
                time.sleep(0.05)
            port = int(port_file.read_text())
            asyncio.run(flood(port, min(500, calls), concurrency))  # warm up
            before, client_before = cpu_seconds(server.pid), cpu_seconds(os.getpid())
            asyncio.run(flood(port, calls, concurrency))
            return (1e6 * (cpu_seconds(server.pid) - before) / calls,
                    1e6 * (cpu_seconds(os.getpid()) - client_before) / calls)
        finally:
            server.kill()
            server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(*args.serve))
        return 0
    results = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            results[mode].append(measure(mode, args.calls, args.concurrency))
    floor = statistics.median(server for server, _ in results["grpc floor"])
    print(f"server CPU per refused Generate ({args.calls} calls, {args.concurrency} concurrent, median of "
          f"{args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); the flooding "
          f"client's own CPU per call (grpc.aio) beside it")
    for mode in MODES:
        best = statistics.median(server for server, _ in results[mode])
        client = statistics.median(client for _, client in results[mode])
        print(f"  {mode:14s} {best:6.0f} us  x{best / floor:.2f} of the grpc floor  client {client:4.0f} us  "
              f"(runs: {', '.join(f'{r:.0f}' for r, _ in results[mode])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
