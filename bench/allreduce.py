"""AllReduce between T processes of one host, 4 KiB to 64 MiB: plain torch.distributed.all_reduce
with gloo (the baseline) against the mesh's paths, GlooGroup (shardmesh.tp_group) and ShmGroup
(shardmesh.shm_allreduce; as the mesh uses it, and forced one-phase / chunked at every size, which
is what sets its CHUNKED_MIN_BYTES), measured in the same run by the same processes.

    .venv/bin/python bench/allreduce.py [--world-size 2] [--seconds 0.5]

Each row: median ms per AllReduce of one fp32 tensor of that size; ratio = baseline ms / path ms
(> 1: faster than plain gloo). Not a test.
"""

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from shardmesh.shm_allreduce import CHUNKED_MIN_BYTES, ShmGroup  # noqa: E402
from shardmesh.tp_group import GlooGroup, free_port  # noqa: E402

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]


def timed(all_reduce, tensor: torch.Tensor, seconds: float, barrier) -> float:
    """Median ms of all_reduce(tensor) over repeats filling about `seconds` (every rank runs the same count)."""
    for _ in range(3):
        all_reduce(tensor)
    start = time.perf_counter()
    all_reduce(tensor)
    once = time.perf_counter() - start
    count = torch.tensor([max(5, min(2000, int(seconds / max(once, 1e-6))))])
    barrier(count)  # the ranks agree on the repeat count (max)
    samples = []
    for _ in range(int(count)):
        start = time.perf_counter()
        all_reduce(tensor)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def worker(rank: int, world_size: int, ports: tuple[int, int], seconds: float, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    agree = lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)  # noqa: E731
    gloo = GlooGroup(rank, world_size, f"127.0.0.1:{ports[1]}", timeout_s=60, name="bench")
    shm = ShmGroup.over(gloo, capacity=max(SIZES), timeout_s=60)

    def shm_with(chunked_min_bytes: int):
        def all_reduce(tensor):
            shm.chunked_min_bytes = chunked_min_bytes  # every rank runs the same path in the same order
            return shm.all_reduce(tensor)
        return all_reduce

    paths = {"torch.distributed gloo": dist.all_reduce, "GlooGroup": gloo.all_reduce,
             "ShmGroup": shm_with(CHUNKED_MIN_BYTES), "ShmGroup one-phase": shm_with(1 << 62),
             "ShmGroup chunked": shm_with(0)}
    for size in SIZES:
        tensor = torch.ones(size // 4)
        row = {name: timed(fn, tensor, seconds, agree) for name, fn in paths.items()}
        if rank == 0:
            results.append((size, row))
    shm.close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent per size and path")
    args = parser.parse_args()
    manager = mp.Manager()
    results = manager.list()
    mp.spawn(worker, args=(args.world_size, (free_port(), free_port()), args.seconds, results),
             nprocs=args.world_size, join=True)
    print(f"AllReduce of fp32, {args.world_size} processes on one host ({os.cpu_count()} cores), median ms:")
    names = list(results[0][1])
    print(f"{'size':>8} " + " ".join(f"{n:>22}" for n in names))
    for size, row in results:
        label = f"{size >> 10} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
        print(f"{label:>8} " + " ".join(f"{row[n]:>19.3f} ms" for n in names))
    print(f"ratio = {names[0]} ms / path ms (> 1: faster than the baseline):")
    for size, row in results:
        label = f"{size >> 10} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
        print(f"{label:>8} " + " ".join(f"{row[names[0]] / row[n]:>22.2f}" for n in names))


if __name__ == "__main__":
    main()
