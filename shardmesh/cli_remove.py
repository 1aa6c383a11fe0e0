"""`shardmesh remove`: take one expert server replica out of a running mesh for good (scale-down;
grpcio + protobuf only).

    shardmesh remove --router 127.0.0.1:50051 10.0.0.7:50061   # drain it, then forget it

The router first drains it live when it holds experts (as `shardmesh rebalance --drain`: they are
loaded and warm elsewhere before the placement switches), then forgets it: no more health probes,
gone from `shardmesh status`, and its registrations refused from then on; stop its process then.
Addresses are those of `shardmesh status` (each replica's host:port). The token comes from
--token-file, else $SHARDMESH_INTERNAL_TOKEN, else $SHARDMESH_AUTH_TOKEN.
"""

import argparse
import sys

import grpc

from shardmesh.cli_rebalance import render
from shardmesh.cli_status import add_connection_arguments, open_channel
from shardmesh.security import INTERNAL_TOKEN_ENV
from shardmesh.v1 import admin_pb2, admin_pb2_grpc

EXIT_ERROR = 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("remove", help="drain one expert server replica and take it out of the mesh",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_arguments(parser, token_env=INTERNAL_TOKEN_ENV)
    parser.set_defaults(timeout=600.0)  # a drain reads experts from the checkpoint
    parser.add_argument("address", metavar="HOST:PORT", help="the expert server replica, as `shardmesh status` lists it")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        channel, metadata = open_channel(args, token_env=INTERNAL_TOKEN_ENV)  # Admin is internal-only
    except (OSError, ValueError) as error:
        print(f"shardmesh remove: {error}", file=sys.stderr)
        return EXIT_ERROR
    with channel:
        try:
            reply = admin_pb2_grpc.AdminStub(channel).RemoveServer(
                admin_pb2.RemoveServerRequest(address=args.address), timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as error:
            print(f"shardmesh remove: {error.code().name}: {error.details()}", file=sys.stderr)
            return EXIT_ERROR
    if reply.drained:
        print(render(reply.drain, dry_run=False))
    replica = f" replica {reply.replica_id!r}" if reply.replica_id else ""
    print(f"removed {reply.name}{replica} at {args.address} (placement v{reply.placement_version}); stop its process",
          flush=True)
    return 0
