"""Who sends a TP stage its steps: the router to every shard, or the router to rank 0, which fans
out to the other shards (what the mesh does: stage_server/tp_link.py)? Measured in the same run.

    .venv/bin/python bench/tp_fanout.py [--tp 2] [--hidden 512] [--layers 4] [--batch 8] [--steps 40]

T shard servers (real stage servers, one process each, one torch thread) of a seeded dense Llama
stage; this process stands in for the router and drives decode steps over the real Step streams:
  rank0-fanout   one stream to rank 0, which forwards each step to the others (the mesh's path);
  router-to-all  one stream to every shard (rank 0's fan-out switched off), the output taken from
                 rank 0's reply, every reply awaited.
Each mode runs twice with fresh processes, alternating (A B A B), to spread the machine's noise.
Prints the median ms per decode step and the ratio rank0-fanout / router-to-all (> 1: sending to
every shard is faster). Not a test.
"""

import argparse
import asyncio
import logging
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import harness

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.tp_decode_step import PROMPT, make_model  # noqa: E402  the same seeded Llama and prompt length


async def serve(args) -> None:
    """One shard server (`--serve NAME`): writes its port to --port-file, serves until SIGTERM."""
    from shardmesh.service_config import ServiceConfig
    from shardmesh.topology import StageSpec, Topology
    from stage_server.main import start_stage_server

    logging.basicConfig(level=logging.WARNING, format=f"{args.serve}: %(message)s")
    torch.set_num_threads(1)
    config = ServiceConfig(model_dir=args.model, name=args.serve, tp_rendezvous=args.rendezvous,
                           topology=Topology((StageSpec("stage-0", 0, args.layers, args.tp),)), data_plane="grpc")
    server = await start_stage_server(config)
    if args.mode == "router-to-all":
        server.servicer.tp_fanout = None  # every shard gets its steps from the driver
    partial = pathlib.Path(args.port_file + ".partial")
    partial.write_text(str(server.port))
    os.replace(partial, args.port_file)  # atomic: the driver never reads half a number
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=None)


async def drive(ports: list[int], mode: str, batch_size: int, steps: int) -> float:
    """Prefill, then `steps` timed decode steps; median ms per step."""
    import grpc
    from shardmesh import codec
    from shardmesh.grpc_util import wait_for_health
    from shardmesh.v1 import stage_pb2, stage_pb2_grpc

    addresses = [f"127.0.0.1:{port}" for port in ports]
    for address in addresses:
        try:
            await wait_for_health(address, 60)
        except TimeoutError:
            async with grpc.aio.insecure_channel(address) as channel:
                info = await stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
            raise RuntimeError(f"{address} ({info.name}) is not serving: {info.not_serving_reason}") from None
    targets = addresses if mode == "router-to-all" else addresses[:1]
    channels = [grpc.aio.insecure_channel(a) for a in targets]
    streams = [stage_pb2_grpc.StageStub(c).Step() for c in channels]
    ids = list(range(batch_size))

    async def step(step_id: int, start: int, count: int) -> None:
        request = stage_pb2.StepRequest(step_id=step_id, sequences=[
            stage_pb2.SequenceSlice(sequence_id=i, start_position=start, num_tokens=count) for i in ids],
            token_ids=codec.encode(torch.randint(3, 500, (batch_size * count,)), arena=None))
        await asyncio.gather(*(s.write(request) for s in streams))
        replies = await asyncio.wait_for(asyncio.gather(*(s.read() for s in streams)), 120)
        assert all(r.step_id == step_id for r in replies), "a shard failed the step"
        codec.decode(replies[0].logits, segment=None)  # the output, from rank 0

    await step(0, 0, PROMPT)
    samples = []
    for i in range(steps):
        started = time.perf_counter()
        await step(i + 1, PROMPT + i, 1)
        samples.append(time.perf_counter() - started)
    for stream in streams:
        stream.cancel()
    for channel in channels:
        await channel.close()
    return statistics.median(samples[3:]) * 1e3


def run_mode(args, model_dir: str, mode: str, workdir: pathlib.Path) -> float:
    from shardmesh.tp_group import free_port

    rendezvous = f"127.0.0.1:{free_port()}"
    names = ["stage-0"] + [f"stage-0/tp{r}" for r in range(1, args.tp)]
    port_files = [workdir / f"{mode}-{r}-{time.monotonic_ns()}.port" for r in range(args.tp)]
    processes = [subprocess.Popen([sys.executable, __file__, "--serve", name, "--model", model_dir, "--mode", mode,
                                   "--rendezvous", rendezvous, "--port-file", str(port_file), "--tp", str(args.tp),
                                   "--layers", str(args.layers)], stdin=subprocess.DEVNULL)
                 for name, port_file in zip(names, port_files)]
    try:
        ports = harness.wait_for_ports(port_files, processes, mode)
        return asyncio.run(drive(ports, mode, args.batch, args.steps))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one shard server
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    modes = ["rank0-fanout", "router-to-all"]
    results: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(tmp, args.hidden, args.layers)
        for _ in range(2):
            for mode in modes:
                results[mode].append(run_mode(args, model_dir, mode, pathlib.Path(tmp)))
    print(f"decode step of a {args.layers}-layer Llama stage (hidden {args.hidden}) at T = {args.tp}, {args.batch} "
          f"sequences, one torch thread per shard process ({os.cpu_count()} cores), median ms per step:")
    best = {m: min(v) for m, v in results.items()}
    for mode in modes:
        print(f"  {mode:<14} {best[mode]:8.3f} ms   (runs: {', '.join(f'{v:.3f}' for v in results[mode])})")
    print(f"  ratio rank0-fanout / router-to-all: {best['rank0-fanout'] / best['router-to-all']:.3f}  "
          f"(> 1: the router sending to every shard is faster)")


if __name__ == "__main__":
    main()
