"""The router's turnaround per decode step, in process, two source trees alternated (A B, then B A).

    .venv/bin/python bench/router_turnaround.py --a /work/main --b /path/to/clone [--batch 16] [--rounds 6]

Each run (a subprocess with PYTHONPATH = the tree) drives the tree's real Scheduler and
StagePipeline (router/pipeline.py, router/stage_link.py) over a shared-memory session whose far
end is a stub stage in the same process: it answers every Step at the next turn of the event loop
with greedy token ids (after streaming `--evict-mib` of memory, as a stage's compute would, so the
router's code and data are cold again as in a real mesh). `--batch` sequences decode, each read by
a consumer task as a Generate stream would. Figures per step, medians over the run:
- turnaround_us: from the stage's reply read (its frame handed to the waiting call) to the next
  step's request written: what the whole mesh waits for, every step;
- after_write_us: from that write to the next reply read, less the stub's own time: the router's
  other work per step (the consumers), which overlaps the stages' compute in a real mesh;
- cpu_us: the process's CPU per step, less the stub's.
"""

import argparse
import os
import pathlib
import subprocess
import sys

import harness

RUN = r'''
import asyncio, statistics, sys, time, torch, uvloop
sys.path.insert(0, sys.argv[4])  # bench/ (shm_stub.py)
from shardmesh import shm_plane
from shardmesh.sampling import Sampler, SamplingParams
from shardmesh.scheduler import Scheduler, Sequence
from shardmesh.shm_pool import ShmPool
from shardmesh.shm_segment import Segment
from shardmesh.v1 import stage_pb2
from router.pipeline import StagePipeline
from shm_stub import stub_channel, stub_seconds
batch, steps, evict_mib = map(int, sys.argv[1:4])
torch.set_num_threads(1)
stamps = {"read": [], "write": [], "stub": []}
clock = time.perf_counter
if hasattr(shm_plane, "FrameStream"):  # fixed call headers: the reply is read when its future resumes the call
    stream_read = shm_plane.FrameStream.read
    def timed_read(stream):
        future = stream_read(stream)
        future.add_done_callback(lambda _: stamps["read"].append(clock()))  # (run after the call's wake-up)
        return future
    shm_plane.FrameStream.read = timed_read
else:
    read_frame = shm_plane.read_frame
    async def timed_read(reader):
        frame = await read_frame(reader)
        stamps["read"].append(clock())
        return frame
    shm_plane.read_frame = timed_read
evict = [torch.ones(evict_mib * 2**18), torch.empty(evict_mib * 2**18)]  # fp32: evict_mib MiB each

def stub_stage(request, reply):
    """The far end of the session: answers each Step with greedy ids at the loop's next turn."""
    stamps["write"].append(clock())
    start = time.thread_time()
    request = stage_pb2.StepRequest.FromString(request)
    ids = [(s.sequence_id * 7919 + s.start_position) % 30000 + 1 for s in request.sequences]
    response = stage_pb2.StepResponse(step_id=request.step_id, greedy_token_ids=ids).SerializeToString()
    stamps["stub"].append(time.thread_time() - start)
    asyncio.get_running_loop().call_soon(answer, reply, response)

def answer(reply, response):
    start = time.thread_time()
    evict[1].copy_(evict[0])
    if stamps["stub"]:  # (not when the warm-up's end cleared them since the call)
        stamps["stub"][-1] += time.thread_time() - start
    reply(response)

async def main():
    pipeline = StagePipeline(data_plane="shm")
    channel = stub_channel("stub", Segment.create(8 << 20), stub_stage)
    pool = ShmPool("stub", channel, lambda size: None)
    async def get(address, grpc_channel):
        return pool
    pipeline.data_planes.get = get
    pipeline.links = [pipeline._new_link("stage-0", "127.0.0.1:9")]
    scheduler = Scheduler(pipeline, max_batch_sequences=64)
    sequences = [Sequence(i + 1, list(range(1, 17)), 10**6, frozenset(), Sampler(SamplingParams(seed=i)))
                 for i in range(batch)]
    async def consume(sequence):
        while True:
            await sequence.events.get()
    consumers = [asyncio.create_task(consume(s)) for s in sequences]
    for sequence in sequences:
        scheduler.submit(sequence)
    scheduler.start()
    while len(stamps["read"]) < 50:  # warm-up
        await asyncio.sleep(0.01)
    for values in stamps.values():
        values.clear()
    stub_seconds[0] = 0.0
    cpu = time.thread_time()
    while len(stamps["read"]) < steps:
        await asyncio.sleep(0.01)
    cpu = time.thread_time() - cpu
    await scheduler.stop()
    for task in consumers:
        task.cancel()
    events = sorted([(t, "read") for t in stamps["read"]] + [(t, "write") for t in stamps["write"]])
    turnaround, after, last = [], [], None  # a read to the next write; a write to the next read
    for t, kind in events:
        if last is not None and last[1] != kind:
            (turnaround if kind == "write" else after).append(t - last[0])
        last = (t, kind)
    stub = statistics.median(stamps["stub"])
    cpu_step = (cpu - sum(stamps["stub"]) - stub_seconds[0]) / len(stamps["read"])
    print(f"{statistics.median(turnaround) * 1e6:.1f} {(statistics.median(after) - stub - stub_seconds[0] / len(stamps['read'])) * 1e6:.1f} {cpu_step * 1e6:.1f}")
uvloop.run(main())
'''
FIGURES = ("turnaround_us", "after_write_us", "cpu_us")


def run(tree: pathlib.Path, batch: int, steps: int, evict_mib: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", RUN, str(batch), str(steps), str(evict_mib),
                          str(pathlib.Path(__file__).resolve().parent)], env=env, cwd=tree,
                         capture_output=True, text=True, timeout=600)  # (cwd: `-c` puts it first on sys.path)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return dict(zip(FIGURES, map(float, out.stdout.split())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=pathlib.Path, required=True)
    parser.add_argument("--b", type=pathlib.Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--evict-mib", type=int, default=16, help="memory streamed by the stub per step (0: none)")
    args = parser.parse_args()
    results = harness.alternate_trees(args.a, args.b, args.rounds, lambda tree: run(tree, args.batch, args.steps, args.evict_mib))
    print(f"\nmedians over {args.rounds} rounds of {args.steps} steps, batch {args.batch}, evict {args.evict_mib} MiB; "
          f"A = {args.a}, B = {args.b}")
    harness.print_medians(results, FIGURES, 16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
