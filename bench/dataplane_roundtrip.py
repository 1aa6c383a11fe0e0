"""One dispatch round trip over the shared-memory data plane vs gRPC bytes, 16 KiB to 4 MiB.

    .venv/bin/python bench/dataplane_roundtrip.py [--rounds 100] [--repeats 5]

A stage -> expert ComputeExperts carrying one group of fp32 rows [n, 512] (the payload), answered
by an echo expert server in another process (bench/echo_servers.py: decode and encode as the real
servicer, no compute), made as RemoteExperts makes it (encode, call, decode the reply). Every
plane is timed in the same run against the same server; the ratios are gRPC time / shm time and
gRPC time / nccl-link time (on the CPU the link is gloo point to point: nccl_dispatch.py).
"""

import argparse
import os
import statistics
import sys

import torch

import harness
import hops

COLUMNS = [("payload", "payload each way"), ("grpc_ms", "gRPC bytes ms"), ("shm_ms", "shared memory ms"),
           ("speedup", "shm speedup"), ("speedup_range", "speedup min-max"), ("grpc_gbs", "gRPC GB/s"),
           ("shm_gbs", "shm GB/s"), ("nccl_ms", "nccl link ms"), ("nccl_speedup", "nccl speedup")]
SIZES_KIB = [16, 64, 256, 1024, 4096]


async def measure(address: str, rounds: int, repeats: int) -> list[dict]:
    """Per payload size, `repeats` alternating runs of each plane (gRPC, shm, gRPC, ...) so that a burst
    of other work on the machine hits both; each figure is the median over the runs, the speedup's
    min-max is over the pairs of runs."""
    rows = []
    for kib in SIZES_KIB:
        payload = torch.randn(kib * 1024 // (4 * 512), 512)  # [n, 512] fp32
        times = {plane: [] for plane in hops.EXPERT_PLANES}
        for _ in range(repeats):
            for plane in hops.EXPERT_PLANES:
                times[plane].append(await hops.expert_round_trip(address, plane, {0: payload},
                                                                 max(10, rounds * 16 // kib)))
        ratios = [g / s for g, s in zip(times["grpc"], times["shm"])]
        grpc_s, shm_s = statistics.median(times["grpc"]), statistics.median(times["shm"])
        moved = 2 * payload.numel() * 4  # there and back
        rows.append(dict(payload=f"{kib} KiB", grpc_ms=grpc_s * 1e3, shm_ms=shm_s * 1e3,
                         speedup=statistics.median(ratios), speedup_range=f"{min(ratios):.2f}-{max(ratios):.2f}",
                         grpc_gbs=moved / grpc_s / 1e9, shm_gbs=moved / shm_s / 1e9,
                         nccl_ms=statistics.median(times["nccl"]) * 1e3,
                         nccl_speedup=statistics.median(g / n for g, n in zip(times["grpc"], times["nccl"]))))
        print(harness.format_table(rows[-1:], COLUMNS), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="round trips per run at 16 KiB (fewer for larger)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per plane and size (default 5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as a stage server runs
    with hops.echo_servers(vocab_size=8) as addresses:
        import uvloop
        rows = uvloop.run(measure(addresses["expert"], args.rounds, args.repeats))
    text = (f"dispatch round trip stage -> expert, one group of fp32 [n, 512], echo server in another process, "
            f"uvloop both sides; 1-min load average {os.getloadavg()[0]:.1f}\n\n" + harness.format_table(rows, COLUMNS))
    print("\n" + text)
    print(f"\nwritten to {harness.save('dataplane_roundtrip', text, dict(rows=rows, argv=sys.argv))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
