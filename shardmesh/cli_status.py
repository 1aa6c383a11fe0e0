"""`shardmesh status`: the mesh's servers, and its expert load per layer (needs grpcio + protobuf only).

    shardmesh status --router 127.0.0.1:50051               # servers, load over the last 60 s
    shardmesh status --router 127.0.0.1:50051 --window 600  # load over the last 10 minutes

Prints the servers (role, address, experts held, tokens computed and busy time in the window),
then for each layer a table of its experts' tokens and replicas (host:port with that replica's
tokens), then a bar chart of the load per expert and a layers x experts shade map. The router's
bearer token comes from --token-file, else $SHARDMESH_AUTH_TOKEN.
"""

import argparse
import sys

import grpc

from shardmesh.security import CLIENT_TOKEN_ENV, add_tls_arguments, bearer_metadata, client_credentials, read_token
from shardmesh.v1 import router_pb2, router_pb2_grpc

EXIT_ERROR = 1
BAR_WIDTH = 40
EIGHTHS = " ▏▎▍▌▋▊▉█"
SHADES = " ░▒▓█"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("status", help="servers and expert load of a running mesh",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_arguments(parser)
    parser.add_argument("--window", type=float, default=60.0, metavar="SECONDS",
                        help="load over the last this-many seconds, in (0, 600] (default 60)")
    parser.add_argument("--no-load", action="store_true", help="servers only: do not ask expert servers for load")
    return parser


def add_connection_arguments(parser: argparse.ArgumentParser, token_env: str = CLIENT_TOKEN_ENV) -> None:
    parser.add_argument("--router", required=True, metavar="HOST:PORT", help="the router's address")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="deadline of the call")
    parser.add_argument("--token-file", metavar="FILE", help=f"bearer token (else ${token_env})")
    add_tls_arguments(parser, client=True)


def open_channel(args: argparse.Namespace, token_env: str = CLIENT_TOKEN_ENV) -> tuple[grpc.Channel, tuple]:
    """(channel to --router, call metadata carrying the token); raises OSError/ValueError on bad files."""
    metadata = bearer_metadata(read_token(args.token_file, token_env))
    if args.tls_ca or args.tls_cert or args.tls_key:
        return grpc.secure_channel(args.router, client_credentials(args.tls_ca, args.tls_cert, args.tls_key)), metadata
    return grpc.insecure_channel(args.router), metadata


def bar(value: float, peak: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `width` cells for value / peak, in eighths of a cell."""
    eighths = round(8 * width * value / peak) if peak > 0 else 0
    return ("█" * (eighths // 8) + (EIGHTHS[eighths % 8] if eighths % 8 else "")).ljust(width)


def render(status: router_pb2.ClusterStatus, with_load: bool = True) -> str:
    lines = [f"mesh {'serving' if status.serving else 'NOT serving'}, placement v{status.placement_version}, "
             f"{status.active_sequences} active sequences", "", "servers"]
    lines.append(f"  {'name':<16} {'role':<7} {'address':<22} holds")
    for server in status.servers:
        role = {router_pb2.SERVER_ROLE_STAGE: "stage", router_pb2.SERVER_ROLE_EXPERT: "expert"}.get(server.role, "?")
        holds = (f"layers [{server.layers.start}, {server.layers.end})" if role == "stage"
                 else f"{len(server.experts)} experts")
        holds += f", {len(server.expert_slices)} split-expert slices" if server.expert_slices else ""
        holds += "".join(f", rank {s.rank}: {s.shard_id}" + (f" (generation {s.generation})" if s.generation else "")
                         for s in server.tp_shards)  # ranks the router gave, and the group each shard last said it is in
        address = server.address if server.registered else "(not registered)"
        lines.append(f"  {server.name:<16} {role:<7} {address:<22} {holds}")
    if not with_load or not status.expert_servers:
        return "\n".join(lines)
    names = {s.address: s.name for s in status.expert_servers}
    lines += ["", f"expert servers, load over {status.load_window_seconds:g} s "
                  f"(imbalance {status.load_imbalance:.2f} = busiest tokens / mean)",
              f"  {'name':<16} {'address':<22} {'experts':>7} {'tokens':>9} {'busy s':>8} {'busy %':>7}"]
    for s in status.expert_servers:
        if s.error:
            lines.append(f"  {s.name:<16} {s.address:<22} {s.experts:>7}  no figures: {s.error}")
            continue
        busy = 100 * s.busy_seconds / s.window_seconds if s.window_seconds > 0 else 0.0
        lines.append(f"  {s.name:<16} {s.address:<22} {s.experts:>7} {s.tokens:>9} {s.busy_seconds:>8.3f} {busy:>6.1f}%")
    layers: dict[int, list] = {}
    for load in status.expert_load:
        layers.setdefault(load.layer, []).append(load)
    for layer, loads in sorted(layers.items()):
        total = sum(l.tokens for l in loads)
        lines += ["", f"layer {layer}: {total} tokens", f"  {'expert':>6} {'tokens':>9} {'share':>6}  replicas (tokens)"]
        for load in loads:
            share = 100 * load.tokens / total if total else 0.0
            replicas = ", ".join(f"{names.get(a, a)}@{a} ({n})" for a, n in zip(load.replica_addresses, load.replica_tokens))
            lines.append(f"  {load.expert:>6} {load.tokens:>9} {share:>5.1f}%  {len(load.replica_addresses)}x: {replicas}")
    peak = max((l.tokens for l in status.expert_load), default=0)
    lines += ["", "load per expert (tokens; x = replicas)"]
    for load in status.expert_load:
        lines.append(f"  L{load.layer:<3} E{load.expert:<3} {bar(load.tokens, peak)} {load.tokens:>9}  "
                     f"x{len(load.replica_addresses)}")
    lines += ["", "shade map (rows: layers, columns: experts; darker = more tokens)"]
    for layer, loads in sorted(layers.items()):
        cells = "".join(SHADES[min(len(SHADES) - 1, round((len(SHADES) - 1) * l.tokens / peak))] * 2 if peak else "  "
                        for l in loads)
        lines.append(f"  L{layer:<3} |{cells}|")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        channel, metadata = open_channel(args)
    except (OSError, ValueError) as error:
        print(f"shardmesh status: {error}", file=sys.stderr)
        return EXIT_ERROR
    request = router_pb2.GetClusterStatusRequest(include_expert_load=not args.no_load,
                                                 load_window_seconds=args.window)
    with channel:
        try:
            status = router_pb2_grpc.RouterStub(channel).GetClusterStatus(request, timeout=args.timeout,
                                                                          metadata=metadata)
        except grpc.RpcError as error:
            print(f"shardmesh status: {error.code().name}: {error.details()}", file=sys.stderr)
            return EXIT_ERROR
    print(render(status, with_load=not args.no_load), flush=True)
    return 0
