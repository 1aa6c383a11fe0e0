"""The dot-product kernels of two source trees, A/B in one process: each tree's
shardmesh/kernels/expert_ffn.c compiled as shardmesh.kernels compiles it and loaded with ctypes,
then shardmesh_linear and shardmesh_expert_ffn called on the same weights and inputs, the two sides
alternated round by round (each first in half the rounds), thread CPU time per call.

    PYTHONPATH=. .venv/bin/python bench/kernel_tree_ab.py --a /work/main --b . [--rounds 7]

Cases: the LM head (32000 x 512, 65 MB, from memory), the attention projections (512 x 512 from
L2/L3: a stage's layers read them every step), one expert's w2 shape (512 x 1024); the experts
(hidden 512, intermediate 1024) over `--experts` of them (from memory, as on an expert server). Prints
per case and row count the median ms of each side, GFLOP/s and GB/s of B, the median of the
per-round ratios A / B (> 1: B is faster) with its min and max, and whether A's and B's outputs
are the same bits (they must be: the kernels promise one summation order).
"""

import argparse
import ctypes
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import harness

COLUMNS = [("case", "case"), ("rows", "rows"), ("a_ms", "A ms"), ("b_ms", "B ms"), ("b_gflops", "B GFLOP/s"),
           ("b_gbs", "B GB/s"), ("ratio", "A / B (median)"), ("spread", "A / B min-max"), ("same", "same bits")]


def build(tree: pathlib.Path, into: pathlib.Path, extra_flags: str) -> ctypes.CDLL:
    """tree's kernels compiled with shardmesh.kernels' compiler and flags (and extra_flags, e.g. a -D
    of a tuning macro) into `into`, loaded."""
    from shardmesh import kernels

    source = tree / "shardmesh" / "kernels"
    library = into / "kernels.so"
    subprocess.run([kernels.compiler(), *kernels.FLAGS, *extra_flags.split(), "-o", str(library), str(source / "expert_ffn.c"),
                    str(source / "decode_attention.c"), "-lm"], check=True)
    loaded = ctypes.CDLL(str(library))
    loaded.shardmesh_linear.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p] * 3
    loaded.shardmesh_expert_ffn.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p] * 6
    return loaded


def linear_case(weights: list[torch.Tensor], x: torch.Tensor, out: torch.Tensor):
    """A call over every weight in turn (each from memory when they are many): library -> None."""
    n, K = x.shape
    M = weights[0].shape[0]

    def run(library: ctypes.CDLL) -> None:
        for weight in weights:
            library.shardmesh_linear(n, K, M, x.data_ptr(), weight.data_ptr(), out.data_ptr())
    return run


def expert_case(experts: list[tuple[torch.Tensor, ...]], x: torch.Tensor, out: torch.Tensor):
    n, H = x.shape
    I = experts[0][0].shape[0]
    scratch = torch.empty(2, n, I)  # gate, up: [2, n, I]

    def run(library: ctypes.CDLL) -> None:
        for w1, w3, w2 in experts:
            library.shardmesh_expert_ffn(n, H, I, x.data_ptr(), w1.data_ptr(), w3.data_ptr(), w2.data_ptr(),
                                         scratch.data_ptr(), out.data_ptr())
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="baseline tree")
    parser.add_argument("--b", required=True, help="candidate tree")
    parser.add_argument("--a-flags", default="", help="extra compiler flags for A (e.g. -DTILE_PF=1)")
    parser.add_argument("--b-flags", default="", help="extra compiler flags for B")
    parser.add_argument("--rows", default="1,2,4,6,8,12,16")
    parser.add_argument("--cases", default="lm_head,proj,w2,experts")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as a_dir, tempfile.TemporaryDirectory() as b_dir:
        sides = {"a": build(pathlib.Path(args.a), pathlib.Path(a_dir), args.a_flags),
                 "b": build(pathlib.Path(args.b), pathlib.Path(b_dir), args.b_flags)}
        shapes = {"lm_head": (32000, 512, 1), "proj": (512, 512, 8), "w2": (512, 1024, 4)}
        rows_out = []
        for case in args.cases.split(","):
            if case == "experts":
                H, I = 512, 1024
                experts = [tuple(torch.randn(shape, generator=generator) * 0.05 for shape in ((I, H), (I, H), (H, I)))
                           for _ in range(args.experts)]
                weight_bytes, flops_per_row = args.experts * 3 * H * I * 4, args.experts * 3 * H * I * 2
            else:
                M, K, copies = shapes[case]
                weights = [torch.randn(M, K, generator=generator) for _ in range(copies)]
                weight_bytes, flops_per_row = copies * M * K * 4, copies * M * K * 2
            for rows in (int(r) for r in args.rows.split(",")):
                if case == "experts":
                    x = torch.randn(rows, 512, generator=generator)
                    outs = {side: torch.empty(rows, 512) for side in sides}
                    runs = {side: expert_case(experts, x, outs[side]) for side in sides}
                else:
                    x = torch.randn(rows, K, generator=generator)
                    outs = {side: torch.empty(rows, M) for side in sides}
                    runs = {side: linear_case(weights, x, outs[side]) for side in sides}
                for side in sides:  # the last weight's (expert's) output left in outs: compared below
                    runs[side](sides[side])
                same = torch.equal(outs["a"], outs["b"])
                times = {side: [] for side in sides}
                for round_index in range(args.rounds):
                    for side in (("a", "b") if round_index % 2 == 0 else ("b", "a")):
                        start = time.thread_time()
                        runs[side](sides[side])
                        times[side].append(time.thread_time() - start)
                ratios = [a / b for a, b in zip(times["a"], times["b"])]
                b_s = statistics.median(times["b"])
                rows_out.append(dict(case=case, rows=rows, a_ms=statistics.median(times["a"]) * 1e3, b_ms=b_s * 1e3,
                                     b_gflops=flops_per_row * rows / b_s / 1e9, b_gbs=weight_bytes / b_s / 1e9,
                                     ratio=f"{statistics.median(ratios):.3f}",
                                     spread=f"{min(ratios):.2f}-{max(ratios):.2f}", same=same))
                print(harness.format_table(rows_out[-1:], COLUMNS), flush=True)
    header = (f"kernels of {args.a} {args.a_flags} (A) vs {args.b} {args.b_flags} (B), fp32, 1 thread, {args.rounds} alternating rounds, "
              f"thread CPU time; 1-min load average {os.getloadavg()[0]:.1f}")
    harness.report("kernel_tree_ab", header, rows_out, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
