"""expert_ffn_many (expert_team.c) of two source trees, alternated in one process: CPU and wall per layer.

    .venv/bin/python bench/expert_team_ab.py --a /work/main --b /path/to/clone [--threads 1,2] [--rows 4]
        [--rounds 8] [--gap-ms 1.3] [--b-cflags "-DNAME=VALUE"]

Compiles each tree's shardmesh/kernels/expert_ffn.c (with the kernels' FLAGS, plus --a-cflags /
--b-cflags) into its own library, loads both, and runs a decode step's expert work as an expert
server at batch 16 does: 64 experts (hidden 512, intermediate 1024, fp32, 403 MB on 2 MiB pages,
so weights come from memory), 8 per layer call, `--rows` rows each, `--gap-ms` asleep before each
call (the helpers go idle, as between layers). Rounds alternate A B / B A. Per layer call: wall
time and the process's CPU time (every thread: the caller, helpers, their waiting), median over
rounds, B / A ratios (< 1: B cheaper). Checks the two libraries' outputs are bit-identical. On a
shared 2-core host state the load (printed) with every figure.
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


def build(tree: pathlib.Path, cflags: str, directory: str, name: str) -> ctypes.CDLL:
    """tree's expert_ffn.c compiled into directory/name.so and loaded."""
    from shardmesh import kernels

    target = os.path.join(directory, f"{name}.so")
    subprocess.run(["cc", *kernels.FLAGS, *cflags.split(), "-o", target,
                    str(tree / "shardmesh/kernels/expert_ffn.c"),
                    str(tree / "shardmesh/kernels/decode_attention.c"), "-lm"], check=True)
    library = ctypes.CDLL(target)
    library.shardmesh_expert_ffn_many.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    library.shardmesh_expert_ffn_many.restype = ctypes.c_long
    return library


def add_tree_arguments(parser: argparse.ArgumentParser) -> None:
    """--a, --b (the two source trees) and --a-cflags, --b-cflags (extra compiler flags for each)."""
    parser.add_argument("--a", type=pathlib.Path, required=True)
    parser.add_argument("--b", type=pathlib.Path, required=True)
    parser.add_argument("--a-cflags", default="")
    parser.add_argument("--b-cflags", default="")


def build_trees(args: argparse.Namespace, directory: str) -> dict[str, ctypes.CDLL]:
    """{"A": tree A's library, "B": tree B's} (build), and a line naming them is printed."""
    print(f"A = {args.a} {args.a_cflags}, B = {args.b} {args.b_cflags}")
    return {"A": build(args.a, args.a_cflags, directory, "a"), "B": build(args.b, args.b_cflags, directory, "b")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tree_arguments(parser)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", default="4")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--gap-ms", type=float, default=1.3)
    parser.add_argument("--unit-bytes", type=int, default=256 * 1024)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from shardmesh import huge_pages
    from shardmesh.kernels import ExpertTask

    H, I, experts, per_layer = 512, 1024, 64, 8
    with tempfile.TemporaryDirectory() as directory:
        libraries = build_trees(args, directory)
        generator = torch.Generator().manual_seed(0)
        weights = [tuple(huge_pages.to_huge_pages([torch.randn(shape, generator=generator) * 0.05
                                                   for shape in ((I, H), (I, H), (H, I))])) for _ in range(experts)]
        print(f"{experts} experts of hidden {H}, intermediate {I} ({experts * 3 * H * I * 4 / 1e6:.0f} MB), "
              f"{per_layer} per call, {args.gap_ms} ms asleep before each")
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(per_layer * rows, H, generator=generator)  # [8 * rows, H] packed
            scratch = torch.empty(2 * I * per_layer * rows)
            outs = {side: torch.empty(per_layer * rows, H) for side in libraries}
            layers = []
            for start in range(0, experts, per_layer):
                tasks = {}
                for side in libraries:
                    tasks[side] = (ExpertTask * per_layer)()
                    for slot, task in enumerate(tasks[side]):
                        w1, w3, w2 = weights[start + slot]
                        task.n, task.x = rows, x.data_ptr() + slot * rows * H * 4
                        task.w1, task.w3, task.w2 = w1.data_ptr(), w3.data_ptr(), w2.data_ptr()
                        task.scratch = scratch.data_ptr() + slot * 2 * rows * I * 4
                        task.out = outs[side].data_ptr() + slot * rows * H * 4
                layers.append(tasks)
            for threads in (int(t) for t in args.threads.split(",")):
                wall, cpu = {"A": [], "B": []}, {"A": [], "B": []}
                for round_index in range(args.rounds):
                    for side in ("A", "B") if round_index % 2 == 0 else ("B", "A"):
                        library, w_total, c_total = libraries[side], 0.0, 0.0
                        for tasks in layers:
                            time.sleep(args.gap_ms / 1e3)
                            c0, w0 = time.process_time(), time.perf_counter()
                            library.shardmesh_expert_ffn_many(per_layer, H, I, tasks[side], threads, args.unit_bytes)
                            w_total += time.perf_counter() - w0
                            c_total += time.process_time() - c0
                        wall[side].append(w_total / len(layers) * 1e6)
                        cpu[side].append(c_total / len(layers) * 1e6)
                same = True
                for tasks in layers:
                    for side in libraries:
                        libraries[side].shardmesh_expert_ffn_many(per_layer, H, I, tasks[side], threads, args.unit_bytes)
                    same = same and torch.equal(outs["A"], outs["B"])
                med = {k: {s: statistics.median(v[s]) for s in v} for k, v in (("wall", wall), ("cpu", cpu))}
                print(f"rows {rows} threads {threads}: wall us A {med['wall']['A']:.0f} B {med['wall']['B']:.0f} "
                      f"B/A {med['wall']['B'] / med['wall']['A']:.3f}; cpu us A {med['cpu']['A']:.0f} "
                      f"B {med['cpu']['B']:.0f} B/A {med['cpu']['B'] / med['cpu']['A']:.3f}; GB/s per CPU-s A "
                      f"{per_layer * 3 * H * I * 4 / med['cpu']['A'] / 1e3:.1f} B "
                      f"{per_layer * 3 * H * I * 4 / med['cpu']['B'] / 1e3:.1f}; identical {same}; "
                      f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
