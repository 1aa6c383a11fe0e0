"""The greedy LM head (shardmesh/greedy_head.py) against today's full head + numpy argmax, alternated
in one process, from memory.

    PYTHONPATH=<tree> .venv/bin/python bench/greedy_head_ab.py [--rows 1,8,16] [--threads 2]
        [--calls 40] [--copies 6] [--vocab 32000] [--hidden 512]

Makes `--copies` heads [V, H] (each 65.5 MB fp32 + its 32.8 MB bf16 copy at the issue's shape, in
2 MiB pages; 6 copies are ~590 MB, past the 480 MiB L3), and times calls, each on the next copy:
A = kernels.linear_team (the stage's LM head at 1-16 rows, on the team) + greedy_token_ids;
B = GreedyHead.tokens (AMX product, bound, refinement). Calls alternate A B / B A. Prints per side
the median and 25th percentile wall time, A / B of the medians (> 1: B faster), the mean and most
candidates per row, whether every call's tokens were its copy's (shardmesh_linear + argmax,
computed untimed beforehand), and the load. x rows are N(0, 1), the heads N(0, 0.05^2), as
bench/lm_head_team_ab.py: candidate counts on a real model's decode differ (the bench checkpoint's:
see the issue note).
"""

import argparse
import os
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from shardmesh import compute_pool, kernels
    from shardmesh.greedy_head import GreedyHead
    from shardmesh.huge_pages import to_huge_pages
    from shardmesh.sampling import greedy_token_ids

    compute_pool.set_threads(args.threads)
    kernel = kernels.kernel()
    generator = torch.Generator().manual_seed(0)
    heads = to_huge_pages([torch.randn(args.vocab, args.hidden, generator=generator) * 0.05
                           for _ in range(args.copies)])
    greedy = [GreedyHead.of(head) for head in heads]
    if greedy[0] is None:
        print("no greedy head here (no AMX, or SHARDMESH_GREEDY_HEAD=0)")
        return 1
    print(f"LM head [{args.vocab}, {args.hidden}] x {args.copies} copies (fp32 + bf16: "
          f"{args.copies * args.vocab * args.hidden * 6 / 1e6:.0f} MB), {args.threads} threads")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, args.hidden, generator=generator)  # [rows, H]
        expected = [greedy_token_ids(kernel.linear(x, head)) for head in heads]  # per copy, untimed
        wall, candidates, agreed, copy = {"A": [], "B": []}, [], True, 0
        for call in range(args.calls + 4):
            tokens = {}
            for side in ("A", "B") if call % 2 == 0 else ("B", "A"):
                start = time.perf_counter()
                if side == "A":
                    tokens[side] = greedy_token_ids(kernel.linear_team(x, heads[copy], args.threads))
                else:
                    tokens[side] = greedy[copy].tokens(x)
                elapsed = time.perf_counter() - start
                agreed &= tokens[side] == expected[copy]
                if side == "B":
                    candidates.extend(greedy[copy].last_candidates)
                copy = (copy + 1) % args.copies
                if call >= 4:
                    wall[side].append(elapsed * 1e3)
        a, b = statistics.median(wall["A"]), statistics.median(wall["B"])
        quartile = {side: statistics.quantiles(wall[side], n=4)[0] for side in wall}
        print(f"rows {rows:2d}: full+argmax {a:.3f} ms (p25 {quartile['A']:.3f}), greedy {b:.3f} ms "
              f"(p25 {quartile['B']:.3f}), A/B {a / b:.2f}x, candidates/row {statistics.mean(candidates):.2f} "
              f"(max {max(candidates)}), tokens agree: {agreed}")
    print(f"load: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
