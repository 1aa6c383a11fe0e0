"""The stage's own Python per MoE layer around a shared-memory expert call, two source trees alternated:
moe_block (gate + dispatch, RemoteExperts' call, combine) with the stage's real RemoteExperts and
shared-memory session, over a fake transport (shm_stub.py: the call written is answered at once by
an echo of its packed tensor where it lies, as an identity expert server would: no socket, no other
process, no expert compute), default shape (hidden 512, 8 experts, top-2), one torch thread.

    .venv/bin/python bench/moe_call_python_ab.py --a /work/main --b /path/to/clone [--batch 1 16]
        [--layers 4000] [--rounds 4]

Each round runs each tree in its own process (PYTHONPATH = the tree), A B then B A, and prints the
process CPU us per layer (the echo's own cost, timed as it runs, subtracted). Caches are warm here: in a
mesh the same code runs 2-4x slower (after the attention's and the expert's memory traffic), so the
ratio says more than the microseconds. Not a test.
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys

CALLER = r'''
import asyncio, sys, time, torch, uvloop
sys.path.insert(0, sys.argv[3])  # bench/ (shm_stub.py)
from stage_server.remote_experts import Placement, RemoteExperts
from shardmesh.models.moe import MoEGate
from shardmesh.models.parallel import moe_block
from shardmesh.shm_pool import ShmPool
from shardmesh.shm_segment import Segment
from shardmesh.v1 import expert_pb2
from shm_stub import stub_channel, stub_seconds

HIDDEN, EXPERTS, TOP_K = 512, 8, 2
batch, layers = int(sys.argv[1]), int(sys.argv[2])


def echo(request, reply):
    """A call answered by a reply whose packed_outputs is the request's own packed tensor (in the
    segment, where the request put it)."""
    start = time.thread_time()
    request = expert_pb2.ComputeExpertsRequest.FromString(request)
    response = expert_pb2.ComputeExpertsResponse(packed_outputs=request.packed.hidden_states).SerializeToString()
    stub_seconds[0] += time.thread_time() - start
    reply(response)


async def main():
    torch.set_num_threads(1)
    experts = RemoteExperts(data_plane="shm", flops_per_row=1.0)
    address = "127.0.0.1:1"  # never dialled: the session below is the address's pool
    await experts.update(Placement(1, {(layer, e): (address,) for layer in range(8) for e in range(EXPERTS)}))
    experts.data_planes._channels[address] = ShmPool(address, stub_channel(address, Segment.create(8 << 20), echo), None)
    generator = torch.Generator().manual_seed(batch)
    gates = [MoEGate(torch.randn(EXPERTS, HIDDEN, generator=generator) * 0.05, TOP_K) for _ in range(8)]
    hidden_states = torch.randn(batch, HIDDEN, generator=generator)  # [T, H]
    residual = torch.randn(batch, HIDDEN, generator=generator)       # [T, H]
    for index in range(200):  # warm-up
        await moe_block(gates[index % 8], hidden_states, experts, index % 8, residual=residual)
    stub_seconds[0] = 0.0
    start = time.process_time()
    for index in range(layers):
        await moe_block(gates[index % 8], hidden_states, experts, index % 8, residual=residual)
    print((time.process_time() - start - stub_seconds[0]) / layers * 1e6)

uvloop.run(main())
'''


def run(tree: pathlib.Path, batch: int, layers: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))  # (and cwd: `python -c` puts the cwd first on sys.path)
    out = subprocess.run([sys.executable, "-c", CALLER, str(batch), str(layers), str(pathlib.Path(__file__).resolve().parent)],
                         env=env, cwd=tree, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=pathlib.Path, required=True, help="tree A (the baseline)")
    parser.add_argument("--b", type=pathlib.Path, required=True, help="tree B")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--layers", type=int, default=4000, help="moe_block calls timed per run")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    results = {(side, batch): [] for side in "AB" for batch in args.batch}
    load_before = os.getloadavg()[0]
    for round_index in range(args.rounds):
        for batch in args.batch:
            for side in ("A", "B") if round_index % 2 == 0 else ("B", "A"):
                results[(side, batch)].append(run(args.a if side == "A" else args.b, batch, args.layers))
    print(f"stage CPU us per MoE layer (moe_block over a fake shared-memory transport; median of {args.rounds} "
          f"alternated rounds of {args.layers} layers; 1-min load {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after); A = {args.a}, B = {args.b}")
    for batch in args.batch:
        a, b = (statistics.median(results[(side, batch)]) for side in "AB")
        print(f"  batch {batch:3d}: A {a:6.1f}  B {b:6.1f}  B / A {b / a:.2f}   "
              f"(A {[round(x) for x in results[('A', batch)]]}, B {[round(x) for x in results[('B', batch)]]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
