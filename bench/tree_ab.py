"""Two source trees (or two mesh configurations), decode rounds alternated between them in one window.

    .venv/bin/python bench/tree_ab.py --a /work/main --b /path/to/clone [--config 1s1e-shm-c2]
        [--config-b CONFIG] [--batches 1,16] [--rounds 6]

With --config-b, side B runs that configuration instead (e.g. --b the same tree as --a, --config
1s1e-shm-c2 --config-b 1s1e-shm-c2-loop0: what --loop-cpu does).

A change's end-to-end effect is a few percent of a decode step, less than what other work on a
shared 2-core machine moves a whole decode_throughput run by. Here both meshes are up at once
(the services of A import shardmesh from tree A: its PYTHONPATH and its own kernel cache
directory; B likewise) and each round times one decode run of each, A B then B A, at every batch
size, so slow minutes hit both sides. Time per output token as in decode_throughput (the mean
gap between a sequence's tokens, skipping the first three); prints the median and best round of
each side, the mesh processes' CPU ms per step (median), and median A / median B (> 1: B is
faster), with the 1-min load average before and after. Tokens must agree between A and B.
"""

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import tempfile

import harness
import mesh_configs
from decode_throughput import make_prompts, run_mesh

COLUMNS = [("batch", "batch"), ("a_ms", "A ms/token median (best)"), ("b_ms", "B ms/token median (best)"),
           ("ratio", "A / B median"), ("a_cpu", "A CPU ms/step"), ("b_cpu", "B CPU ms/step"), ("agree", "same tokens")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=pathlib.Path, required=True, help="tree A (the baseline)")
    parser.add_argument("--b", type=pathlib.Path, required=True, help="tree B")
    parser.add_argument("--config", default="1s1e-shm-c2", choices=list(mesh_configs.CONFIGS))
    parser.add_argument("--config-b", choices=list(mesh_configs.CONFIGS), help="side B's (default: --config)")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cache-dir", type=pathlib.Path, default=harness.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    from shardmesh.config import ModelConfig
    from shardmesh.launcher import Launcher

    model_dir = harness.checkpoint("small" if args.small else "default", args.cache_dir)
    config = ModelConfig.from_dir(model_dir)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = make_prompts(config.vocab_size, max(batches), 16)
    meshes_by_side = {"a": mesh_configs.CONFIGS[args.config], "b": mesh_configs.CONFIGS[args.config_b or args.config]}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-tree-ab-") as workdir, contextlib.ExitStack() as meshes:
        launchers = {}
        for side, tree in (("a", args.a), ("b", args.b)):
            mesh = meshes_by_side[side]
            topology_file = mesh.write(pathlib.Path(workdir) / f"topology-{side}.toml", config)
            env = {**mesh.env, "PYTHONPATH": str(tree.resolve()),
                   "SHARDMESH_KERNEL_DIR": str(pathlib.Path(workdir) / f"kernels-{side}")}
            with harness.environment(env):
                launchers[side] = meshes.enter_context(Launcher(
                    model_dir, topology_file, threads_per_service=mesh.thread_counts,
                    service_args=mesh.service_args, log_level="WARNING", no_auth=True))
        times = {(side, batch): [] for side in "ab" for batch in batches}
        cpu = {(side, batch): [] for side in "ab" for batch in batches}
        by_process = {(side, batch): [] for side in "ab" for batch in batches}  # [{process: CPU s/step}]
        tokens = {}
        for round_index in range(args.rounds):
            for batch in batches:
                for side in ("a", "b") if round_index % 2 == 0 else ("b", "a"):
                    launcher = launchers[side]
                    result = run_mesh(launcher.router_address, launcher.client_token, prompts[:batch],
                                      args.new_tokens, 1, {name: p.pid for name, p in launcher.processes.items()})
                    times[(side, batch)].append(result["tpot_s"] * 1e3)
                    cpu[(side, batch)].append(result["cpu_s"] * 1e3)
                    by_process[(side, batch)].append(result["cpu_by_process"])
                    tokens[(side, batch)] = result["tokens"]
    rows = []
    for batch in batches:
        a, b = (statistics.median(times[(side, batch)]) for side in "ab")
        rows.append(dict(batch=batch, a_ms=f"{a:.1f} ({min(times[('a', batch)]):.1f})",
                         b_ms=f"{b:.1f} ({min(times[('b', batch)]):.1f})", ratio=f"{a / b:.3f}",
                         a_cpu=f"{statistics.median(cpu[('a', batch)]):.1f}",
                         b_cpu=f"{statistics.median(cpu[('b', batch)]):.1f}",
                         agree=tokens[("a", batch)] == tokens[("b", batch)]))
    header = (f"tree A {args.a} ({args.config}) vs tree B {args.b} ({args.config_b or args.config}): {args.rounds} alternating rounds of "
              f"{args.new_tokens} new tokens; {os.cpu_count()} cores, 1-min load average {load_before:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after")
    harness.report("tree_ab", header, rows, COLUMNS)
    for (side, batch), runs in by_process.items():  # median CPU ms per step of each process
        print(f"{side.upper()} b{batch} CPU ms/step by process: " + ", ".join(
            f"{name} {statistics.median(run[name] for run in runs) * 1e3:.1f}" for name in runs[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
