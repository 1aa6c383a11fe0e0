"""One dispatch round trip over the shared-memory data plane vs gRPC bytes, 16 KiB to 4 MiB.

    .venv/bin/python bench/dataplane_roundtrip.py [--rounds 200]

A stage -> expert ComputeExperts carrying one group of fp32 rows [n, 512] (the payload), answered
by an echo expert server in another process (bench/echo_servers.py: decode and encode as the real
servicer, no compute), made as RemoteExperts makes it (encode, call, decode the reply). Both
planes are timed in the same run against the same server; the ratio is gRPC time / shm time.
"""

import argparse
import os
import sys

import torch

import harness
import hops

COLUMNS = [("payload", "payload each way"), ("grpc_ms", "gRPC bytes ms"), ("shm_ms", "shared memory ms"),
           ("speedup", "shm speedup"), ("grpc_gbs", "gRPC GB/s"), ("shm_gbs", "shm GB/s")]
SIZES_KIB = [16, 64, 256, 1024, 4096]


async def measure(address: str, rounds: int) -> list[dict]:
    rows = []
    for kib in SIZES_KIB:
        payload = torch.randn(kib * 1024 // (4 * 512), 512)  # [n, 512] fp32
        times = {plane: await hops.expert_round_trip(address, plane, {0: payload}, max(10, rounds * 16 // kib))
                 for plane in hops.PLANES}
        moved = 2 * payload.numel() * 4  # there and back
        rows.append(dict(payload=f"{kib} KiB", grpc_ms=times["grpc"] * 1e3, shm_ms=times["shm"] * 1e3,
                         speedup=times["grpc"] / times["shm"], grpc_gbs=moved / times["grpc"] / 1e9,
                         shm_gbs=moved / times["shm"] / 1e9))
        print(harness.format_table(rows[-1:], COLUMNS), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200, help="round trips timed at 16 KiB (fewer for larger)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as a stage server runs
    with hops.echo_servers(vocab_size=8) as addresses:
        import uvloop
        rows = uvloop.run(measure(addresses["expert"], args.rounds))
    text = (f"dispatch round trip stage -> expert, one group of fp32 [n, 512], echo server in another process, "
            f"uvloop both sides; 1-min load average {os.getloadavg()[0]:.1f}\n\n" + harness.format_table(rows, COLUMNS))
    print("\n" + text)
    print(f"\nwritten to {harness.save('dataplane_roundtrip', text, dict(rows=rows, argv=sys.argv))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
