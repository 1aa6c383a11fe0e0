"""CPU time per hop: what one round trip costs the caller's and the callee's processes, over gRPC
bytes and over shared memory, made as the mesh makes them (bench/hops.py: the stage's RemoteExperts.run
for stage -> expert, the router's StageLink for router -> stage) to echo servers that do no compute.

    .venv/bin/python bench/hop_cpu.py [--rounds 2000] [--batch 1,16]

Wall time per hop swings with whatever else the machine runs; the CPU seconds a round trip takes
(user + system, from /proc, caller and callee) hardly do, so they show what a change to the per-hop
code saves. Each hop is measured over both planes in the same run; the table gives shm / gRPC ratios.
Batch b sends, per MoE layer, the groups a decode step of b tokens makes (top-2 of 8 experts: 2 groups
of 1 row at b = 1, 8 groups of b/4 rows above); the logits reply is [b, vocab] float32.
"""

import argparse
import os
import sys

import torch

import harness
import hops

COLUMNS = [("hop", "hop"), ("batch", "batch"), ("plane", "plane"), ("wall_us", "wall us"),
           ("caller_us", "caller CPU us"), ("callee_us", "callee CPU us"), ("cpu_vs_grpc", "CPU x gRPC")]
VOCAB = 32000
HIDDEN = 512


def layer_groups(batch: int) -> dict[int, torch.Tensor]:
    """expert -> [rows, H]: one MoE layer's groups at this batch size (top-2 of 8 experts)."""
    if batch == 1:
        return {0: torch.randn(1, HIDDEN), 3: torch.randn(1, HIDDEN)}
    return {expert: torch.randn(max(1, batch // 4), HIDDEN) for expert in range(8)}


async def measure(addresses: dict, server_pid: int, batches: list[int], rounds: int) -> list[dict]:
    rows = []
    for batch in batches:
        logits_rounds = max(10, rounds // max(1, batch // 2))  # a [batch, vocab] reply: fewer rounds
        hop_calls = {
            "stage -> expert (RemoteExperts.run)": (rounds, lambda plane: hops.remote_experts_round_trip(
                addresses["expert"], plane, layer_groups(batch), rounds)),
            "router -> stage, hidden states": (rounds, lambda plane: hops.stage_round_trip(
                addresses["stage_hidden"], plane, batch, HIDDEN, rounds)),
            "router -> stage, logits": (logits_rounds, lambda plane: hops.stage_round_trip(
                addresses["stage_logits"], plane, batch, HIDDEN, logits_rounds)),
        }
        for hop, (count, run) in hop_calls.items():
            cpu = {}
            for plane in hops.PLANES:
                caller, callee = harness.cpu_seconds([]), harness.cpu_seconds([server_pid])
                seconds = await run(plane)  # mean wall seconds per round trip (after warm-up)
                # The whole run's CPU (warm-up, setup) over the timed rounds: slightly high, alike for both planes.
                caller_us = (harness.cpu_seconds([]) - caller) / count * 1e6
                callee_us = (harness.cpu_seconds([server_pid]) - callee) / count * 1e6
                cpu[plane] = caller_us + callee_us
                rows.append(dict(hop=hop, batch=batch, plane=plane, wall_us=seconds * 1e6, caller_us=caller_us,
                                 callee_us=callee_us, cpu_vs_grpc=f"{cpu[plane] / cpu['grpc']:.2f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as every service runs
    pids: list[int] = []
    with hops.echo_servers(VOCAB, pids) as addresses:
        import uvloop
        rows = uvloop.run(measure(addresses, pids[0], [int(b) for b in args.batch.split(",")], args.rounds))
    harness.report("hop_cpu", f"CPU per round trip, caller and callee (echo servers, no compute); 1-min load "
                   f"average {os.getloadavg()[0]:.1f}", rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
