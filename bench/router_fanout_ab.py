"""The router's client fan-out per decode step: two trees' RouterServicer.Generate in one process.

    PYTHONPATH=<tree B> .venv/bin/python bench/router_fanout_ab.py --a <tree A> --b <tree B> [--steps 500] [--batch 16]

Both trees' router/servicer.py and shardmesh/text.py are loaded side by side (the rest of
shardmesh, the scheduler's hand-over included, is tree B's; `--a-queue` gives side A's sequences
an asyncio.Queue as their events, as main had before SequenceEvents). Each side is a real
grpc.aio server with the router's interceptors (shardmesh.grpc_util.new_server) on one event loop
(uvloop, pinned to CPU 0, gRPC's threads to CPU 1 as --loop-cpu 0 does); a client process opens
`--batch` Generate streams to each. A fake scheduler then emits one token per stream per step
through Scheduler._emit, sides alternated step by step (A B, B A, ...), and the event-loop thread's
CPU time from the emit until everything settles (4 ms) is the step's fan-out cost: the hand-over,
each token's text piece, metrics, response, the gRPC write and its completion.
Prints the median and mean loop-thread CPU per step of each side and A / B (> 1: B cheaper).
"""

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import threading
import time
import types

import grpc  # noqa: F401 (before uvloop: grpc.aio picks the loop's poller)
import uvloop

import harness
from shardmesh import grpc_util
from shardmesh.scheduler import Scheduler, TokenEvent
from shardmesh.v1 import router_pb2_grpc
from router.caller_limit import CallerLimit

CLIENT = """
import asyncio, grpc, sys
from shardmesh.v1 import router_pb2, router_pb2_grpc
async def streams(port, batch, steps):
    async with grpc.aio.insecure_channel(f'127.0.0.1:{port}') as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        async def one():
            count = 0
            async for _ in stub.Generate(router_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_new_tokens=steps,
                                                                    ignore_eos=True)):
                count += 1
            assert count == steps, count
        await asyncio.gather(*(one() for _ in range(batch)))
async def main(port_a, port_b, batch, steps):
    await asyncio.gather(streams(port_a, batch, steps), streams(port_b, batch, steps))
asyncio.run(main(*map(int, sys.argv[1:5])))
"""


def load(tree: str, relative: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(tree, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeScheduler(Scheduler):
    """Takes the submitted sequences; the bench emits their tokens."""

    def __init__(self, queue_events: bool):
        super().__init__(pipeline=None)
        self.sequences, self.queue_events = [], queue_events

    def submit(self, sequence):
        if self.queue_events:
            sequence.events = asyncio.Queue()
        self.sequences.append(sequence)

    def cancel(self, sequence):
        pass


async def start(tree: str, side: str, checkpoint, queue_events: bool):
    servicer = load(tree, "router/servicer.py", f"servicer_{side}")
    text = load(tree, "shardmesh/text.py", f"text_{side}")
    servicer.IncrementalDecoder = text.IncrementalDecoder
    scheduler = FakeScheduler(queue_events)
    state = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=32000, eos_token_ids=[2]),
                                  admission_full=lambda: False, max_context=4096, serving=True, max_queued=64,
                                  caller_limit=CallerLimit(0), text=text.TextCodec.from_model_dir(checkpoint),
                                  scheduler=scheduler)
    server = grpc_util.new_server(None)
    router_pb2_grpc.add_RouterServicer_to_server(servicer.RouterServicer(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, scheduler, port


async def run(args) -> tuple[list[float], list[float]]:
    checkpoint = harness.checkpoint("default")
    sides = [await start(str(args.a), "a", checkpoint, args.a_queue), await start(str(args.b), "b", checkpoint, False)]
    me = threading.get_native_id()
    for task in os.listdir("/proc/self/task"):  # as shardmesh.loop_cpu.pin(0)
        if int(task) != me:
            os.sched_setaffinity(int(task), {1})
    os.sched_setaffinity(0, {0})
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, str(sides[0][2]), str(sides[1][2]),
                                                  str(args.batch), str(args.steps))
    while any(len(scheduler.sequences) < args.batch for _, scheduler, _ in sides):
        await asyncio.sleep(0.01)
    cpu: tuple[list[float], list[float]] = ([], [])
    token_ids = [(7919 * k) % 30000 + 100 for k in range(args.steps)]  # ids the tokenizer has
    for k in range(args.steps):
        for side in (0, 1) if k % 2 == 0 else (1, 0):
            scheduler = sides[side][1]
            await asyncio.sleep(0.004)
            start_cpu = time.thread_time()
            for sequence in scheduler.sequences:
                sequence.generated.append(token_ids[k])
                scheduler._emit(sequence, TokenEvent(token_ids[k], k, "length" if k == args.steps - 1 else None, None))
            await asyncio.sleep(0.004)  # every write done
            cpu[side].append(time.thread_time() - start_cpu)
    if await client.wait():
        raise RuntimeError("the client's streams failed")
    for server, _, _ in sides:
        await server.stop(None)
    return cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="tree A (the baseline)")
    parser.add_argument("--b", required=True, help="tree B (also the PYTHONPATH: the rest of shardmesh)")
    parser.add_argument("--a-queue", action="store_true", help="side A's sequences' events in an asyncio.Queue")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    cpu = uvloop.run(run(args))
    skip = 10  # warm-up steps
    a, b = ([c * 1e6 for c in side[skip:]] for side in cpu)
    print(f"loop-thread CPU per step of {args.batch} tokens, {args.steps} steps alternated, "
          f"load {load_before:.1f} -> {os.getloadavg()[0]:.1f}; A = {args.a}, B = {args.b}")
    print(f"  median  A {statistics.median(a):6.0f} us  B {statistics.median(b):6.0f} us  "
          f"A / B {statistics.median(a) / statistics.median(b):.3f}")
    print(f"  mean    A {statistics.mean(a):6.0f} us  B {statistics.mean(b):6.0f} us  "
          f"A / B {statistics.mean(a) / statistics.mean(b):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
