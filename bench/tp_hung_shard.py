"""What a hung (SIGSTOPped) shard of a TP = 2 stage costs: how long rank 0 takes to fail the step
it is in, to report NOT_SERVING, and to refuse the next step, with the group AllReducing over gloo
or shared memory, for a given --tp-collective-timeout. Measured in one run, each AllReduce twice
(gloo shm gloo shm), fresh processes each time.

    .venv/bin/python bench/tp_hung_shard.py [--collective-timeout 20] [--layers 2] [--hidden 256]

Two shard servers (real stage servers, one process each) of a seeded dense Llama stage; this
process stands in for the router: it prefills, steps a few decode steps, SIGSTOPs rank 1, sends
one more step and times (a) the step's failure, (b) rank 0's health turning NOT_SERVING, (c) the
failure of a further step. Gloo is forced by giving the shards different host ids. Not a test.
"""

import argparse
import asyncio
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import torch

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.tp_fanout import PROMPT, make_model  # noqa: E402


async def serve(args) -> None:
    """One shard server (`--serve NAME`): writes its port to --port-file, serves until SIGTERM."""
    from shardmesh.service_config import ServiceConfig
    from shardmesh.topology import StageSpec, Topology
    from stage_server.main import start_stage_server

    logging.basicConfig(level=logging.WARNING, format=f"{args.serve}: %(message)s")
    torch.set_num_threads(1)
    host = args.serve if args.all_reduce == "gloo" else "one-host"  # different ids: gloo
    config = ServiceConfig(model_dir=args.model, name=args.serve, tp_rendezvous=args.rendezvous, host_id=host,
                           topology=Topology((StageSpec("stage-0", 0, args.layers, 2),)), data_plane="grpc",
                           tp_collective_timeout=args.collective_timeout)
    server = await start_stage_server(config)
    partial = pathlib.Path(args.port_file + ".partial")
    partial.write_text(str(server.port))
    os.replace(partial, args.port_file)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=None)


async def drive(port: int, hang, bound_s: float) -> dict[str, float]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from shardmesh import codec
    from shardmesh.grpc_util import wait_for_health
    from shardmesh.v1 import stage_pb2, stage_pb2_grpc

    address = f"127.0.0.1:{port}"
    await wait_for_health(address, 120)
    async with grpc.aio.insecure_channel(address) as channel:
        stub, health = stage_pb2_grpc.StageStub(channel), health_pb2_grpc.HealthStub(channel)

        def request(step_id: int, start: int, count: int) -> stage_pb2.StepRequest:
            return stage_pb2.StepRequest(step_id=step_id, sequences=[stage_pb2.SequenceSlice(
                sequence_id=1, start_position=start, num_tokens=count)],
                token_ids=codec.encode(torch.randint(3, 500, (count,)), arena=None))

        async def one_step(message) -> str:
            call = stub.Step(iter([message]), timeout=bound_s)
            try:
                async for _ in call:
                    pass
                return "ok"
            except grpc.aio.AioRpcError as error:
                return f"{error.code().name}: {error.details()[:100]}"

        assert await one_step(request(0, 0, PROMPT)) == "ok"
        for i in range(3):
            assert await one_step(request(i + 1, PROMPT + i, 1)) == "ok"
        hang()
        started = time.monotonic()
        failed_step = asyncio.ensure_future(one_step(request(9, PROMPT + 3, 1)))
        not_serving = None
        while time.monotonic() - started < bound_s and (not_serving is None or not failed_step.done()):
            status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
            if not_serving is None and status == health_pb2.HealthCheckResponse.NOT_SERVING:
                not_serving = time.monotonic() - started
            await asyncio.sleep(0.05)
        outcome = await failed_step
        step_failed = time.monotonic() - started  # upper bound: polled
        next_started = time.monotonic()
        next_outcome = await one_step(request(10, PROMPT + 3, 1))
        return {"step failed s": step_failed, "NOT_SERVING s": not_serving or float("nan"),
                "next step failed s": time.monotonic() - next_started, "outcome": outcome, "next": next_outcome}


def run(args, model_dir: str, all_reduce: str, workdir: pathlib.Path) -> dict:
    from shardmesh.tp_group import free_port

    rendezvous = f"127.0.0.1:{free_port()}"
    port_files = [workdir / f"{all_reduce}-{r}-{time.monotonic_ns()}.port" for r in range(2)]
    processes = [subprocess.Popen([sys.executable, __file__, "--serve", name, "--model", model_dir, "--all-reduce",
                                   all_reduce, "--rendezvous", rendezvous, "--port-file", str(port_file), "--layers",
                                   str(args.layers), "--collective-timeout", str(args.collective_timeout)],
                                  stdin=subprocess.DEVNULL)
                 for name, port_file in zip(["stage-0", "stage-0/tp1"], port_files)]
    try:
        port = harness.wait_for_ports(port_files, processes, all_reduce)[0]
        return asyncio.run(drive(port, lambda: processes[1].send_signal(signal.SIGSTOP),
                                 args.collective_timeout * 2 + 30))
    finally:
        processes[1].send_signal(signal.SIGCONT)
        for process in processes:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collective-timeout", type=float, default=20.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one shard server
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--all-reduce", default="gloo", help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(tmp, args.hidden, args.layers)
        results = [(mode, run(args, model_dir, mode, pathlib.Path(tmp))) for mode in ["gloo", "shm"] * 2]
    print(f"TP = 2 stage, rank 1 SIGSTOPped mid-decode, --tp-collective-timeout {args.collective_timeout} s "
          f"(load average {os.getloadavg()[0]:.1f}):")
    for mode, result in results:
        print(f"  {mode:<5} step failed {result['step failed s']:6.2f} s   NOT_SERVING {result['NOT_SERVING s']:6.2f} s   "
              f"next step failed {result['next step failed s']:5.2f} s   ({result['outcome']})")


if __name__ == "__main__":
    main()
