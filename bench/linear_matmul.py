"""A stage's dense products at decode row counts: torch (models.matmul.linear's choice) against the C kernel
in its dot-product form (`kernel`, `Kernel.linear`) and its outer-product form (`wide`, `Kernel.linear_wide`).

    .venv/bin/python bench/linear_matmul.py [--rows 1,2,4,8,16,32,64] [--rounds 5]

The weights a stage reads every decode step: the LM head [vocab, H] (65 MB at the issue's shape,
read from memory) and attention projections ([H, H], [kv, H]: 1 MB or less, warm in the caches
when a stage holds few layers, not when it holds many). Each `--copies` distinct copies of a
weight are used in turn so that each call reads its weight from memory as in serving. At one torch
thread, alternating rounds, the best of each kept; thread CPU time. Prints GB/s and torch / kernel
time (> 1: the kernel is faster), torch / wide and kernel / wide (> 1: the outer-product form is
faster), and each form's largest difference from F.linear relative to the largest |output|.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import harness

COLUMNS = [("weight", "weight [out, in]"), ("rows", "rows"), ("torch_ms", "torch ms/call"),
           ("kernel_ms", "kernel ms/call"), ("torch_gbs", "torch GB/s"), ("kernel_gbs", "kernel GB/s"),
           ("speedup", "torch / kernel time"), ("error", "kernel vs F.linear"), ("wide_ms", "wide ms/call"),
           ("wide_gbs", "wide GB/s"), ("wide_vs_torch", "torch / wide time"), ("wide_vs_kernel", "kernel / wide time"),
           ("wide_error", "wide vs F.linear")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--shapes", default="32000x512,512x512,256x512,1024x512,512x1024", help="weights as OUTxIN")
    parser.add_argument("--bytes-per-shape", type=float, default=400e6, help="distinct copies of each weight to cycle through")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from shardmesh import kernels
    from shardmesh.models import matmul

    kernel = kernels.kernel()
    if kernel is None:
        parser.error("the C kernels are unavailable here (see the log above)")
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    for shape in args.shapes.split(","):
        features_out, features_in = (int(v) for v in shape.split("x"))
        size = features_out * features_in * 4
        copies = max(1, int(args.bytes_per_shape // size))
        weights = [torch.randn(features_out, features_in, generator=generator) for _ in range(copies)]
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = torch.randn(rows, features_in, generator=generator)
            functions = {"torch": lambda w: matmul.torch_linear(inputs, w), "kernel": lambda w: kernel.linear(inputs, w),
                         "wide": lambda w: kernel.linear_wide(inputs, w)}
            best = dict.fromkeys(functions, float("inf"))
            for round_index in range(args.rounds):  # alternating orders: each form runs first and last
                for name in (list(functions) if round_index % 2 == 0 else list(functions)[::-1]):
                    start = time.thread_time()
                    for weight in weights:
                        functions[name](weight)
                    best[name] = min(best[name], (time.thread_time() - start) / copies)
            reference = F.linear(inputs, weights[0])
            scale = reference.abs().max()
            error = ((kernel.linear(inputs, weights[0]) - reference).abs().max() / scale).item()
            wide_error = ((kernel.linear_wide(inputs, weights[0]) - reference).abs().max() / scale).item()
            rows_out.append(dict(weight=shape, rows=rows, torch_ms=best["torch"] * 1e3, kernel_ms=best["kernel"] * 1e3,
                                 torch_gbs=size / best["torch"] / 1e9, kernel_gbs=size / best["kernel"] / 1e9,
                                 wide_ms=best["wide"] * 1e3, wide_gbs=size / best["wide"] / 1e9,
                                 speedup=f"{best['torch'] / best['kernel']:.2f}", error=f"{error:.1e}",
                                 wide_vs_torch=f"{best['torch'] / best['wide']:.2f}",
                                 wide_vs_kernel=f"{best['kernel'] / best['wide']:.2f}", wide_error=f"{wide_error:.1e}"))
            print(harness.format_table(rows_out[-1:], COLUMNS), flush=True)
    header = (f"dense products, fp32, 1 thread, best of {args.rounds} alternating rounds; "
              f"1-min load average {os.getloadavg()[0]:.1f}")
    harness.report("linear_matmul", header, rows_out, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
