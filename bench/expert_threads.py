"""A layer's experts over the expert server's compute threads: how they are handed out.

    .venv/bin/python bench/expert_threads.py [--threads 2] [--layer-experts 2,8] [--rows 1,4] [--rounds 15]
        [--small-pages] [--gap-ms 1.3]

At batch 1 a layer sends its expert server 2 experts of 1 row; at batch 16 about 8 experts of
2-6 rows. Each pass runs every one of `--experts` experts (400 MB at the default 64: weights come
from memory, as in serving; on 2 MiB pages as the expert server holds them, on 4 KiB pages with
`--small-pages`) once, `layer-experts` at a time, as the server would, in these ways:
- `one`: one after another on the calling thread (expert_ffn, 1 thread: the baseline);
- `pool`: compute_pool.parallel_map over the layer's experts, whole experts dealt round-robin to
  `--threads` Python threads (what the expert server did before expert_ffn_many);
- `team`: kernels' expert_ffn_many: each expert cut into ~256 KB units taken from one counter by
  the calling thread and threads - 1 helper threads of the C library.
With `--gap-ms G`, each layer's call follows G ms asleep, as on an expert server while its stage
computes between layers (the helper threads, and their cores, have gone idle by then); only the
calls are timed. Wall time per pass (the threads' work overlaps), rounds alternated in order A B C / C B A in one
process; prints the best and the median round of each, the effective read bandwidth, and one /
pool, one / team, pool / team time ratios of the medians (> 1: the latter is faster). On a
shared 2-core host other work takes cores from the helpers: state the load with every figure.
"""

import argparse
import os
import statistics
import sys
import time

import torch

import harness

NAMES = ("one", "pool", "team")
COLUMNS = [("layer_experts", "experts per layer"), ("rows", "rows per expert"),
           *[(f"{name}_ms", f"{name} ms/pass best/median") for name in NAMES],
           *[(f"{name}_gbs", f"{name} GB/s (median)") for name in NAMES],
           ("one_pool", "one / pool"), ("one_team", "one / team"), ("pool_team", "pool / team"),
           ("identical", "team == one")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layer-experts", default="2,8")
    parser.add_argument("--rows", default="1,4")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--small-pages", action="store_true", help="weights on 4 KiB pages (default: 2 MiB)")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="asleep before each layer's call (not timed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from shardmesh import compute_pool, huge_pages, kernels

    kernel = kernels.kernel()
    if kernel is None:
        parser.error("the C kernels are unavailable here (see the log above)")
    compute_pool.set_threads(args.threads)
    H, I = args.hidden, args.intermediate
    generator = torch.Generator().manual_seed(0)
    weights = [tuple(torch.randn(shape, generator=generator) * 0.05 for shape in ((I, H), (I, H), (H, I)))
               for _ in range(args.experts)]
    if not args.small_pages:
        weights = [tuple(huge_pages.to_huge_pages(list(expert))) for expert in weights]
    weight_bytes = args.experts * 3 * H * I * 4

    rows_out = []
    for layer_experts in (int(e) for e in args.layer_experts.split(",")):
        layers = [list(range(start, min(start + layer_experts, args.experts)))
                  for start in range(0, args.experts, layer_experts)]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, H, generator=generator)

            def one(layer):
                return [kernel.expert_ffn(x, *weights[e]) for e in layer]

            def pool(layer):
                return compute_pool.parallel_map(lambda e: kernel.expert_ffn(x, *weights[e]), layer)

            def team(layer):
                return kernel.expert_ffn_many([(x, *weights[e]) for e in layer], args.threads)

            functions = dict(one=one, pool=pool, team=team)
            times = {name: [] for name in NAMES}
            for round_index in range(args.rounds):
                for name in NAMES if round_index % 2 == 0 else NAMES[::-1]:
                    elapsed = 0.0
                    for layer in layers:
                        if args.gap_ms:
                            time.sleep(args.gap_ms / 1e3)
                        start = time.perf_counter()
                        functions[name](layer)
                        elapsed += time.perf_counter() - start
                    times[name].append(elapsed)
            median = {name: statistics.median(times[name]) for name in NAMES}
            identical = all(torch.equal(a, b) for layer in layers for a, b in zip(one(layer), team(layer)))
            rows_out.append(dict(
                layer_experts=layer_experts, rows=rows,
                **{f"{name}_ms": f"{min(times[name]) * 1e3:.1f}/{median[name] * 1e3:.1f}" for name in NAMES},
                **{f"{name}_gbs": f"{weight_bytes / median[name] / 1e9:.1f}" for name in NAMES},
                one_pool=f"{median['one'] / median['pool']:.2f}", one_team=f"{median['one'] / median['team']:.2f}",
                pool_team=f"{median['pool'] / median['team']:.2f}", identical=identical))
    compute_pool.set_threads(1)
    header = (f"a layer's experts over {args.threads} threads: {args.experts} experts of hidden {H}, intermediate {I}, "
              f"fp32 ({weight_bytes / 1e6:.0f} MB, {'4 KiB' if args.small_pages else '2 MiB'} pages) per pass, "
              f"{args.gap_ms} ms asleep before each layer, {args.rounds} alternating rounds; "
              f"1-min load average {os.getloadavg()[0]:.1f}")
    harness.report("expert_threads", header, rows_out, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
