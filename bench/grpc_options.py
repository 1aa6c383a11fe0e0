"""gRPC channel options, chosen by measurement: stage -> expert round trips (ComputeExperts) over
gRPC bytes with candidate client-channel options, against the echo expert server (the servers keep
grpc_util.SERVER_OPTIONS), each relative to shardmesh's own options measured in the same run.

    .venv/bin/python bench/grpc_options.py [--rounds 200]
"""

import argparse
import functools
import os
import sys

import grpc
import torch

import harness
import hops
from shardmesh import codec, grpc_util
from shardmesh.v1 import expert_pb2, expert_pb2_grpc

CANDIDATES = {
    "shardmesh (grpc_util.GRPC_OPTIONS)": [],
    "+ optimization_target=latency": [("grpc.optimization_target", "latency")],
    "+ optimization_target=throughput": [("grpc.optimization_target", "throughput")],
    "+ no BDP probe": [("grpc.http2.bdp_probe", 0)],
    "+ 4 MiB write buffer": [("grpc.http2.write_buffer_size", 4 * 2**20)],
    "+ 8 MiB initial window (lookahead)": [("grpc.http2.lookahead_bytes", 8 * 2**20)],
    "+ no retries": [("grpc.enable_retries", 0)],
    "+ local subchannel pool": [("grpc.use_local_subchannel_pool", 1)],
    "+ 4 MiB write buffer + 8 MiB lookahead": [("grpc.http2.write_buffer_size", 4 * 2**20),
                                               ("grpc.http2.lookahead_bytes", 8 * 2**20)],
}
SIZES_KIB = [16, 1024]
COLUMNS = [("options", "client channel options")] + [(f"{kib}", f"{kib} KiB ms") for kib in SIZES_KIB] + \
          [(f"{kib}_vs", f"{kib} KiB vs ours") for kib in SIZES_KIB]


async def round_trip(address: str, options: list, payload: torch.Tensor, rounds: int) -> float:
    merged = dict(grpc_util.GRPC_OPTIONS)
    merged.update(options)
    async with grpc.aio.insecure_channel(address, options=list(merged.items())) as channel:
        stub = expert_pb2_grpc.ExpertStub(channel)
        encode = functools.partial(codec.encode, arena=None)

        async def call():
            request = expert_pb2.ComputeExpertsRequest(groups=[
                expert_pb2.ExpertGroup(layer=0, expert=0, hidden_states=encode(payload))])
            reply = await stub.ComputeExperts(request, timeout=30)
            return codec.decode(reply.outputs[0], "outputs[0]", segment=None)

        return await hops.timed(call, rounds)


async def measure(address: str, rounds: int, repeats: int) -> list[dict]:
    """The best of `repeats` passes over all candidates (in a rotated order each pass, so that a
    busy moment of the machine does not land on one candidate only)."""
    payloads = {kib: torch.randn(kib * 1024 // 2048, 512) for kib in SIZES_KIB}
    rows = [{"options": name} for name in CANDIDATES]
    for repeat in range(repeats):
        names = list(CANDIDATES)
        for index in [(i + repeat) % len(names) for i in range(len(names))]:
            row = rows[index]
            for kib, payload in payloads.items():
                ms = 1e3 * await round_trip(address, CANDIDATES[names[index]], payload, max(10, rounds * 16 // kib))
                row[f"{kib}"] = min(ms, row.get(f"{kib}", ms))
    for row in rows:
        for kib in SIZES_KIB:
            row[f"{kib}_vs"] = row[f"{kib}"] / rows[0][f"{kib}"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="round trips per timing at 16 KiB (fewer for larger)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the candidates; the best counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with hops.echo_servers(vocab_size=8) as addresses:
        import uvloop
        rows = uvloop.run(measure(addresses["expert"], args.rounds, args.repeats))
    text = (f"ComputeExperts round trip over gRPC bytes by client channel options (lower is better; 'vs ours' < 1 "
            f"= faster than grpc_util's); 1-min load average {os.getloadavg()[0]:.1f}\n\n"
            + harness.format_table(rows, COLUMNS))
    print(text)
    print(f"\nwritten to {harness.save('grpc_options', text, dict(rows=rows, argv=sys.argv))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
