"""Expert MLP formulations at the row counts of a decode step, weights streamed from memory.

    .venv/bin/python bench/expert_matmul.py [--experts 64] [--rows 1,2,3,4,6,8,12,16,24,32] [--rounds 5]

An expert on an expert server computes w2(silu(w1 x) * w3 x) for the n_e tokens routed to it: at
batch 16, top-2 of 8 experts, n_e is mostly 2-6. Each pass runs every one of `--experts` experts
(the default shape: hidden 512, intermediate 1024, fp32; 64 experts = 400 MB, far beyond the
caches, as on an expert server holding a whole model's experts) once on the same `rows` inputs,
so each weight comes from memory as in serving. Formulations, alternated round by round in one
process at one torch thread (as a service runs), the best round of each kept:
- `fused`: w1 and w3 concatenated into one [2I, H] weight, one matmul, then chunk (the former
  layers.SwiGLUMLP);
- `split`: two [I, H] matmuls (layers.SwiGLUMLP's torch path, the baseline);
- `kernel`: shardmesh.kernels' C kernel (layers.SwiGLUMLP on fp32 CPU weights), every weight row
  streamed once for all rows.
Prints ms per pass (thread CPU time, which other work on a shared machine hardly changes), the
effective read bandwidth, split / fused and split / kernel time (> 1: the kernel is faster). fused
and split must be bit-identical; the kernel sums in another order: its largest difference from split,
relative to split's largest |output|, is printed.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import harness

COLUMNS = [("rows", "rows per expert"), ("fused_ms", "fused ms/pass"), ("split_ms", "split ms/pass"),
           ("kernel_ms", "kernel ms/pass"), ("fused_gbs", "fused GB/s"), ("split_gbs", "split GB/s"),
           ("kernel_gbs", "kernel GB/s"), ("ratio", "split / fused time"), ("speedup", "split / kernel time"),
           ("identical", "fused == split"), ("kernel_error", "kernel vs split")]
NAMES = ("fused", "split", "kernel")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--rows", default="1,2,3,4,6,8,12,16,24,32")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from shardmesh import kernels
    from shardmesh.models.layers import SwiGLUMLP

    kernel = kernels.kernel()
    if kernel is None:
        parser.error("the C kernels are unavailable here (see the log above)")

    H, I = args.hidden, args.intermediate
    generator = torch.Generator().manual_seed(0)
    experts = [SwiGLUMLP(*(torch.randn(shape, generator=generator) * 0.05 for shape in ((I, H), (I, H), (H, I))))
               for _ in range(args.experts)]
    for mlp in experts:
        mlp.kernel = None  # `split` is torch's path at every row count
    fused_weights = [torch.cat([mlp.gate_proj, mlp.up_proj]) for mlp in experts]  # [2I, H] each

    def fused(index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(hidden_states, fused_weights[index]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(F.silu(gate) * up, experts[index].down_proj)

    def split(index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        return experts[index](hidden_states)

    def with_kernel(index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        mlp = experts[index]
        return kernel.expert_ffn(hidden_states, mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    functions = dict(fused=fused, split=split, kernel=with_kernel)

    weight_bytes = args.experts * 3 * H * I * 4
    rows_list = [int(r) for r in args.rows.split(",")]
    rows_out = []
    for rows in rows_list:
        hidden_states = torch.randn(rows, H, generator=generator)
        best = dict.fromkeys(NAMES, float("inf"))
        for round_index in range(args.rounds):
            order = NAMES if round_index % 2 == 0 else NAMES[::-1]
            for name in order:
                function = functions[name]
                start = time.thread_time()
                for index in range(args.experts):
                    function(index, hidden_states)
                best[name] = min(best[name], time.thread_time() - start)
        identical = all(torch.equal(fused(i, hidden_states), split(i, hidden_states)) for i in range(args.experts))
        error = max(((with_kernel(i, hidden_states) - split(i, hidden_states)).abs().max()
                     / split(i, hidden_states).abs().max()).item() for i in range(args.experts))
        rows_out.append(dict(rows=rows, **{f"{name}_ms": best[name] * 1e3 for name in NAMES},
                             **{f"{name}_gbs": weight_bytes / best[name] / 1e9 for name in NAMES},
                             ratio=f"{best['split'] / best['fused']:.2f}", speedup=f"{best['split'] / best['kernel']:.2f}",
                             identical=identical, kernel_error=f"{error:.1e}"))
    header = (f"expert MLP, {args.experts} experts of hidden {H}, intermediate {I}, fp32 ({weight_bytes / 1e6:.0f} MB), "
              f"1 thread, best of {args.rounds} alternating rounds; 1-min load average {os.getloadavg()[0]:.1f}")
    harness.report("expert_matmul", header, rows_out, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
