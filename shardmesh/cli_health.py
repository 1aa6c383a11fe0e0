"""`shardmesh health`: ask a server's grpc.health.v1 whether it is SERVING (a container health check).

    shardmesh health --address 127.0.0.1:50051                          # the server as a whole
    shardmesh health --address 127.0.0.1:50051 --service shardmesh.v1.Router

Exits 0 only when the server answers SERVING; 1 when it answers anything else (NOT_SERVING,
UNKNOWN, an unknown service) or cannot be reached within --timeout. Prints the status on one
line. Needs grpcio and grpcio-health-checking, never torch: it runs every few seconds in every
container and starts fast.
"""

import argparse

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `health` subcommand to an argparse subparsers object; returns its parser."""
    parser = subparsers.add_parser("health", help="exit 0 if a server's grpc.health.v1 says SERVING",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, metavar="HOST:PORT", help="the server to ask")
    parser.add_argument("--service", default="", help="a service name (default: the server as a whole)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    return parser


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, what the server said) for one grpc.health.v1 Check on `address`."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def run(args: argparse.Namespace) -> int:
    serving, said = check(args.address, args.service, args.timeout)
    print(f"{args.address}{' ' + args.service if args.service else ''}: {said}", flush=True)
    return EXIT_SERVING if serving else EXIT_NOT_SERVING
