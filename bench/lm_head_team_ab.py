"""shardmesh_linear_team (the LM head on the team) of two source trees, alternated in one process.

    .venv/bin/python bench/lm_head_team_ab.py --a /path/to/base --b /path/to/clone [--rows 1,8,16]
        [--threads 2] [--calls 40] [--copies 10] [--b-cflags "-DNAME=VALUE"]

Compiles each tree's kernels as bench/expert_team_ab.py does (its `build`), loads both, and times
out [rows, 32000] = x [rows, 512] W^T, the LM head at the issue's shape, each call on the next of
`--copies` copies of W (65.5 MB each, on 2 MiB pages): with 10 copies each call reads its weight
from memory; with 1 it comes from L3 (480 MiB here), which shows the arithmetic's floor. Calls
alternate A B / B A. Prints per side the median and the 25th percentile of the wall time per call,
B / A of the medians (< 1: B faster), whether the outputs are bit-identical, and the load. Each
library has its own team (team.c): if one side's caller waited on a descheduled helper, that side
runs its next 64 calls alone; on a busy host the medians then differ for that reason only, so
compare quiet windows (load well under 2) at 2 threads, or use 1 thread.
"""

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time

import torch

from expert_team_ab import add_tree_arguments, build_trees


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tree_arguments(parser)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--unit-bytes", type=int, default=256 * 1024)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from shardmesh import huge_pages

    K, M = 512, 32000
    with tempfile.TemporaryDirectory() as directory:
        libraries = build_trees(args, directory)
        for library in libraries.values():
            library.shardmesh_linear_team.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int,
                                                                                                  ctypes.c_long]
            library.shardmesh_linear_team.restype = ctypes.c_long
        generator = torch.Generator().manual_seed(0)
        weights = huge_pages.to_huge_pages([torch.randn(M, K, generator=generator) * 0.05 for _ in range(args.copies)])
        print(f"LM head [{M}, {K}] ({M * K * 4 / 1e6:.1f} MB) x {args.copies} copies")
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, K, generator=generator)  # [rows, K]
            outs = {side: torch.empty(rows, M) for side in libraries}  # [rows, M]
            for threads in (int(t) for t in args.threads.split(",")):
                wall, copy = {"A": [], "B": []}, 0
                for call in range(args.calls + 4):
                    for side in ("A", "B") if call % 2 == 0 else ("B", "A"):
                        start = time.perf_counter()
                        libraries[side].shardmesh_linear_team(rows, K, M, x.data_ptr(), weights[copy].data_ptr(),
                                                              outs[side].data_ptr(), threads, args.unit_bytes)
                        if call >= 4:  # the first calls warm the teams and the caches
                            wall[side].append((time.perf_counter() - start) * 1e3)
                        copy = (copy + 1) % args.copies
                for side in libraries:  # both on one copy: the same bits?
                    libraries[side].shardmesh_linear_team(rows, K, M, x.data_ptr(), weights[0].data_ptr(),
                                                          outs[side].data_ptr(), threads, args.unit_bytes)
                same = torch.equal(outs["A"], outs["B"])
                median = {side: statistics.median(times) for side, times in wall.items()}
                p25 = {side: statistics.quantiles(times, n=4)[0] for side, times in wall.items()}
                print(f"rows {rows} threads {threads}: ms A {median['A']:.3f} (p25 {p25['A']:.3f}) B {median['B']:.3f} "
                      f"(p25 {p25['B']:.3f}) B/A {median['B'] / median['A']:.3f}; identical {same}; "
                      f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
