"""One stage -> expert call over the shared-memory plane, both sides in one process on cold caches,
two source trees alternated (A B then B A, each run in its own process, PYTHONPATH = the tree).

    .venv/bin/python bench/shm_hop_cold_ab.py --a /work/main --b /path/to/clone [--batch 16] [--calls 1500] [--rounds 4]

Each run starts a real expert server's shared-memory plane (ExpertServicer over the small seeded
checkpoint, kernel on one thread, its time taken out of the figures) and the stage's RemoteExperts on one
event loop in this process, with one session between them over a real Unix socket. Each call is
what moe_block makes over a sole server: RemoteExperts.lend(layer), the packed groups written into
the lent segment (a decode step of `--batch` tokens: 8 experts x batch/4 rows, 2 at batch 1), lent.run,
the answer read where it lies. Before each call a 100 MB read evicts the caches (in a mesh the
attention's and the experts' memory traffic do), so the figure is the transport's Python and
syscalls as a decode step pays them: wall us per call less the kernel's (client write to reply read, both sides' Python
and the socket, the loop's turns in between; no other process, so no wake-up of another CPU) and this
thread's CPU us per call. Not a test.
"""

import argparse
import os
import pathlib
import subprocess
import sys

import harness

HERE = pathlib.Path(__file__).resolve().parent
CALLER = r'''
import asyncio, statistics, sys, time, torch, uvloop
sys.path.insert(0, sys.argv[3])
import harness
from shardmesh import compute_pool
from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.expert_model import ExpertShard
from shardmesh.models.packed_rows import PackedRows
from shardmesh.shm_plane import ShmChannel
from shardmesh.shm_pool import ShmPool
from shardmesh.shm_server import Method, start_data_plane
from shardmesh.v1 import expert_pb2
from expert_server.servicer import ExpertServicer
from stage_server.remote_experts import Placement, RemoteExperts

batch, calls = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
compute_pool.set_threads(1)
EVICT = torch.ones(25 << 20)  # 100 MB
KERNEL = [0.0]  # seconds in the expert kernel (ExpertShard.compute_packed), taken out of the wall figure


def timed_kernel(compute):
    def compute_packed(*args):
        start = time.perf_counter()
        try:
            return compute(*args)
        finally:
            KERNEL[0] += time.perf_counter() - start
    return compute_packed


async def main():
    model_dir = harness.checkpoint("small")
    config = ModelConfig.from_dir(model_dir)
    layers, hidden = config.num_layers, config.hidden_size
    shard = ExpertShard(config, [(l, e) for l in range(layers) for e in range(config.num_experts)],
                        CheckpointReader(model_dir))
    shard.compute_packed = timed_kernel(shard.compute_packed)
    servicer = ExpertServicer("experts", shard, torch.float32)
    method = "shardmesh.v1.Expert/ComputeExperts"
    plane, _ = await start_data_plane("experts", {method: Method(expert_pb2.ComputeExpertsRequest,
                                                                 servicer.ComputeExperts)}, enabled=True)
    address = "127.0.0.1:1"  # never dialled: the session below is the address's pool
    experts = RemoteExperts(data_plane="shm", flops_per_row=1.0)
    await experts.update(Placement(1, {(l, e): (address,) for l in range(layers) for e in range(8)}))
    channel = await ShmChannel.open(address, plane.offer(), 8 << 20)
    experts.data_planes._channels[address] = ShmPool(address, channel, None)
    counts = (1, 1) if batch == 1 else (max(1, batch // 4),) * 8
    chosen = (2, 5) if batch == 1 else tuple(range(8))

    async def call(index):  # (the rows are whatever the segment holds: the kernel's figures are taken out)
        layer = index % layers
        async with experts.lend(layer) as lent:
            rows = lent.rows(sum(counts), hidden, torch.float32)
            return await lent.run(PackedRows(rows, chosen, counts))

    for index in range(200):
        await call(index)
    walls, cpus = [], []
    for index in range(calls):
        EVICT.sum()
        wall, cpu, kernel = time.perf_counter(), time.thread_time(), KERNEL[0]
        await call(index)
        kernel = KERNEL[0] - kernel
        walls.append(time.perf_counter() - wall - kernel)
        cpus.append(time.thread_time() - cpu - kernel)
    print(f"{statistics.median(walls) * 1e6:.1f} {statistics.median(cpus) * 1e6:.1f}")
    await experts.close()
    await plane.stop()

uvloop.run(main())
'''
FIGURES = ("wall_us", "cpu_us")


def run(tree: pathlib.Path, batch: int, calls: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))  # (and cwd: `python -c` puts the cwd first on sys.path)
    out = subprocess.run([sys.executable, "-c", CALLER, str(batch), str(calls), str(HERE)], env=env, cwd=tree,
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return dict(zip(FIGURES, map(float, out.stdout.split()[-2:])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=pathlib.Path, required=True, help="tree A (the baseline)")
    parser.add_argument("--b", type=pathlib.Path, required=True, help="tree B")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    results = harness.alternate_trees(args.a, args.b, args.rounds, lambda tree: run(tree, args.batch, args.calls))
    print(f"\nmedian per call (cold caches), medians over {args.rounds} rounds of {args.calls} calls, batch "
          f"{args.batch}; A = {args.a}, B = {args.b}")
    harness.print_medians(results, FIGURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
