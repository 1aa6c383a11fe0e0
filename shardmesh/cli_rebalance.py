"""`shardmesh rebalance`: change a running mesh's expert placement live (grpcio + protobuf only).

    shardmesh rebalance --router 127.0.0.1:50051                  # plan from the last 60 s of load, apply
    shardmesh rebalance --router 127.0.0.1:50051 --dry-run        # show the plan only
    shardmesh rebalance --router 127.0.0.1:50051 --drain experts-c  # empty a server before removing it

The router plans in the manner of DeepSeek's EPLB (replicate the heaviest experts, bin-pack by
load), has expert servers load and warm new replicas, switches every stage between steps, then
drains and drops old replicas; generations in flight continue. The token comes from --token-file,
else $SHARDMESH_INTERNAL_TOKEN, else $SHARDMESH_AUTH_TOKEN.
"""

import argparse
import sys

import grpc

from shardmesh.cli_status import add_connection_arguments, open_channel
from shardmesh.security import INTERNAL_TOKEN_ENV
from shardmesh.v1 import admin_pb2, admin_pb2_grpc

EXIT_ERROR = 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("rebalance", help="re-place experts of a running mesh by observed load",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_arguments(parser, token_env=INTERNAL_TOKEN_ENV)
    parser.set_defaults(timeout=600.0)
    parser.add_argument("--window", type=float, default=60.0, metavar="SECONDS",
                        help="plan from the load of the last this-many seconds, in (0, 600] (default 60)")
    parser.add_argument("--slots", type=int, default=0, metavar="N",
                        help="most (layer, expert) replicas per server (default: 1.25 x an even share)")
    parser.add_argument("--drain", action="append", default=[], metavar="NAME|HOST:PORT",
                        help="empty this expert server (repeatable)")
    parser.add_argument("--min-gain", type=float, default=0.0, metavar="FRACTION",
                        help="keep the placement unless the busiest server's load falls by more than this")
    parser.add_argument("--dry-run", action="store_true", help="plan and print, change nothing")
    return parser


def _experts(entries) -> str:
    return "; ".join(f"{e.name or e.address}: " + " ".join(f"L{k.layer}E{k.expert}" for k in e.experts)
                     for e in entries) or "none"


def render(reply: admin_pb2.RebalanceResponse, dry_run: bool) -> str:
    verb = "would change" if dry_run and len(reply.loaded) + len(reply.dropped) else (
        "changed" if reply.changed else "kept")
    lines = [f"placement {verb} (v{reply.placement_version}) in {reply.seconds:.2f} s: imbalance "
             f"{reply.imbalance_before:.2f} -> {reply.imbalance_after:.2f} (busiest server's load / mean)"]
    if reply.changed or dry_run:
        lines += [f"  load:  {_experts(reply.loaded)}", f"  drop:  {_experts(reply.dropped)}"]
    lines += ["  placement:"] + [f"    {e.name or '?':<16} {e.address:<22} {len(e.experts):>4} experts"
                                 for e in reply.placement]
    if reply.note:
        lines.append(f"  note: {reply.note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.slots < 0:
        print(f"shardmesh rebalance: --slots {args.slots} must be >= 0", file=sys.stderr)
        return EXIT_ERROR
    try:
        channel, metadata = open_channel(args, token_env=INTERNAL_TOKEN_ENV)  # Admin is internal-only
    except (OSError, ValueError) as error:
        print(f"shardmesh rebalance: {error}", file=sys.stderr)
        return EXIT_ERROR
    request = admin_pb2.RebalanceRequest(load_window_seconds=args.window, slots_per_server=args.slots,
                                         drain=args.drain, min_gain=args.min_gain, dry_run=args.dry_run)
    with channel:
        try:
            reply = admin_pb2_grpc.AdminStub(channel).Rebalance(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as error:
            print(f"shardmesh rebalance: {error.code().name}: {error.details()}", file=sys.stderr)
            return EXIT_ERROR
    print(render(reply, args.dry_run), flush=True)
    return 0
