"""The stage -> expert hop of a decode step with a real expert server (bench/expert_hop_server.py) over
shared memory, two source trees alternated: A B then B A, round after round (whichever runs first
in a pair is favoured on a busy machine, so each tree goes first half the time).

    .venv/bin/python bench/expert_hop_ab.py --a /work/main --b /path/to/clone [--shape small] [--rounds 4] [--batch 1]

Each run starts the expert server and a caller from one tree (PYTHONPATH = the tree), makes
`--calls` RemoteExperts.run calls cycling over the layers, each with one layer's groups of a decode
step of `--batch` tokens (2 experts x 1 row at batch 1; 8 groups of batch/4 rows above), and
reports the mean wall time per call and CPU per call: the caller's process, the expert server's
main thread (its per-call Python, and its share of the expert compute: what a decode step waits
for), and the server's process. CPU hardly moves with other work on the machine;
wall time does. The small shape's compute is tiny, so its CPU figures are mostly per-call overhead.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import harness

HERE = pathlib.Path(__file__).resolve().parent
CALLER = r'''
import asyncio, os, sys, time, torch, uvloop
from stage_server.remote_experts import Placement, RemoteExperts
port, layers, hidden, calls, pid, batch = map(int, sys.argv[1:7])
tick = os.sysconf("SC_CLK_TCK")
def cpu(path):
    fields = open(path).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick
async def main():
    experts = RemoteExperts(data_plane="shm", flops_per_row=1.0)
    await experts.update(Placement(1, {(l, e): (f"127.0.0.1:{port}",) for l in range(layers) for e in range(8)}))
    if batch == 1:  # a decode step's groups per layer: top-2 of 8 experts, 1 row each at batch 1, 8 groups of b/4 above
        groups = [{1 + l % 3: torch.randn(1, hidden), 5 + l % 3: torch.randn(1, hidden)} for l in range(layers)]
    else:
        groups = [{e: torch.randn(max(1, batch // 4), hidden) for e in range(8)} for l in range(layers)]
    for i in range(100):
        await experts.run(i % layers, groups[i % layers])
    paths = (f"/proc/{pid}/task/{pid}/stat", f"/proc/{pid}/stat")
    start, caller, server = time.perf_counter(), time.process_time(), [cpu(p) for p in paths]
    for i in range(calls):
        await experts.run(i % layers, groups[i % layers])
    wall, caller = time.perf_counter() - start, time.process_time() - caller
    server = [cpu(p) - s for p, s in zip(paths, server)]
    print(" ".join(f"{x / calls * 1e6:.1f}" for x in (wall, caller, *server)))
    await experts.close()
uvloop.run(main())
'''
FIGURES = ("wall_us", "caller_cpu_us", "server_main_thread_cpu_us", "server_cpu_us")


def run(tree: pathlib.Path, shape: str, calls: int, batch: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    server = subprocess.Popen([sys.executable, str(HERE / "expert_hop_server.py"), "--shape", shape],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        info = json.loads(server.stdout.readline())
        out = subprocess.run([sys.executable, "-c", CALLER, str(info["port"]), str(info["layers"]), str(info["hidden"]),
                              str(calls), str(server.pid), str(batch)], env=env, capture_output=True, text=True, timeout=600,
                             cwd=tree)  # (`-c` puts the cwd first on sys.path: run from another tree, it would be that one)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return dict(zip(FIGURES, map(float, out.stdout.split())))
    finally:
        server.terminate()
        server.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=pathlib.Path, required=True)
    parser.add_argument("--b", type=pathlib.Path, required=True)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1, help="the decode batch whose per-layer groups each call carries")
    args = parser.parse_args()
    results = harness.alternate_trees(args.a, args.b, args.rounds, lambda tree: run(tree, args.shape, args.calls, args.batch))
    print(f"\nmedians over {args.rounds} rounds, {args.calls} calls each, shape {args.shape}, batch {args.batch}; A = {args.a}, B = {args.b}")
    harness.print_medians(results, FIGURES, 28)
    return 0


if __name__ == "__main__":
    sys.exit(main())
