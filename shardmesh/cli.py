"""The `shardmesh` command line.

    shardmesh demo                     make a small model, run a mesh, generate, check against transformers
    shardmesh up --model DIR           every service of a topology as local processes
    shardmesh router|stage|expert ...  one service (what a container runs)
    shardmesh generate --router ADDR   stream a generation (needs only grpcio + protobuf)
    shardmesh status --router ADDR     servers and expert load per layer (grpcio + protobuf)
    shardmesh rebalance --router ADDR  re-place experts by observed load, live (grpcio + protobuf)
    shardmesh remove --router ADDR A   drain expert server replica A (host:port), take it out for good
    shardmesh make-checkpoint DIR      a seeded random checkpoint (needs transformers)
    shardmesh certs DIR                a local test CA and certificates for (mutual) TLS
    shardmesh topology --model DIR     print the default topology for a model
    shardmesh health --address ADDR    exit 0 if a server's grpc.health.v1 says SERVING (health checks)
    shardmesh compose|k8s ...          docker-compose file / Kubernetes manifests from a topology file

Subcommands import what they need when they run, so `shardmesh generate` works without torch."""

import argparse
import pathlib
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardmesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job: a local mesh checked against transformers")
    demo.add_argument("--model", type=pathlib.Path, help="checkpoint dir (default: make ./demo-model)")
    demo.add_argument("--max-new-tokens", type=int, default=16)

    up = commands.add_parser("up", help="start a whole mesh as local processes")
    up.add_argument("--model", required=True, type=pathlib.Path)
    up.add_argument("--topology", type=pathlib.Path, help="topology TOML (default: the model's default)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--device", default="", help="cpu or cuda:N for every service (default: each server's "
                    "`device` in the topology file, else cpu)")
    up.add_argument("--dtype", default="", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    up.add_argument("--threads", type=int, default=1, help="torch threads per service")
    up.add_argument("--compute-threads", type=int, default=0,
                    help="compute threads of each stage and expert server (default 0 = 2 on a host of 2+ cores)")
    up.add_argument("--loop-cpu", type=int, default=None, metavar="CPU",
                    help="every service's event loop on this CPU, their other threads on the others: faster "
                         "hand-offs where the services take turns (one micro-batch; see shardmesh.loop_cpu; "
                         "default off)")
    up.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    up.add_argument("--no-auth", action="store_true", help="no tokens (default: fresh random ones, printed)")
    up.add_argument("--auth-tokens-file", type=pathlib.Path, metavar="FILE",
                    help="named client tokens the router also accepts, one `NAME TOKEN` a line (the router's "
                         "--auth-tokens-file; callers then show in its logs and limits by name)")
    from shardmesh.security import add_tls_arguments
    add_tls_arguments(up)

    from shardmesh.serve import add_service_arguments
    for role in ("router", "stage", "expert"):
        add_service_arguments(commands.add_parser(role, help=f"run one {role} service"), role)

    from shardmesh.cli_generate import add_parser as add_generate
    add_generate(commands)
    from shardmesh.cli_rebalance import add_parser as add_rebalance
    from shardmesh.cli_status import add_parser as add_status
    add_status(commands)
    add_rebalance(commands)
    from shardmesh.cli_remove import add_parser as add_remove
    add_remove(commands)

    from shardmesh.cli_health import add_parser as add_health
    add_health(commands)
    from shardmesh.cli_deploy import add_parsers as add_deploy
    add_deploy(commands)

    certs = commands.add_parser("certs", help="make a local test CA and service/client certificates (for TLS)")
    certs.add_argument("dir", type=pathlib.Path)
    certs.add_argument("--hosts", default="127.0.0.1,localhost", metavar="NAME,IP,...",
                       help="names and addresses the services are reached by (default: %(default)s)")
    certs.add_argument("--days", type=int, default=30)

    make = commands.add_parser("make-checkpoint", help="write a seeded random checkpoint (needs transformers)")
    make.add_argument("out", type=pathlib.Path)
    make.add_argument("--family", default="mixtral", choices=["mixtral", "llama"])
    make.add_argument("--seed", type=int, default=0)

    topology = commands.add_parser("topology", help="print the default topology of a model as TOML")
    topology.add_argument("--model", required=True, type=pathlib.Path)
    topology.add_argument("--stages", type=int, default=2)
    topology.add_argument("--expert-servers", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("router", "stage", "expert"):
        from shardmesh.launcher import die_with_launcher
        die_with_launcher()  # a no-op unless `shardmesh up` (Launcher) started this service
        from shardmesh.serve import run_service
        return run_service(args.command, args)
    if args.command == "up":
        from shardmesh.cli_up import run_up
        return run_up(args.model, args.topology, args.host, args.dtype, args.threads, args.log_level,
                      device=args.device, no_auth=args.no_auth, tls=_tls_files(args, args.no_auth),
                      compute_threads=args.compute_threads, tokens_file=args.auth_tokens_file,
                      loop_cpu=args.loop_cpu)
    if args.command == "certs":
        from shardmesh.certs import run
        return run(args)
    if args.command == "health":
        from shardmesh.cli_health import run
        return run(args)
    if args.command in ("compose", "k8s"):
        from shardmesh.cli_deploy import run
        return run(args, sys.argv[1:] if argv is None else argv)
    if args.command in ("status", "rebalance"):
        from shardmesh import cli_rebalance, cli_status
        return (cli_status if args.command == "status" else cli_rebalance).run(args)
    if args.command == "remove":
        from shardmesh.cli_remove import run
        return run(args)
    if args.command == "generate":
        from shardmesh.cli_generate import run
        return run(args)
    if args.command == "demo":
        from shardmesh.demo import run_demo
        return run_demo(args.model, args.max_new_tokens)
    if args.command == "make-checkpoint":
        from shardmesh.checkpoint_maker import make_checkpoint
        make_checkpoint(args.out, args.family, seed=args.seed, progress=lambda m: print(m, flush=True))
        print(f"wrote {args.out}")
        return 0
    if args.command == "topology":
        from shardmesh.config import ModelConfig
        from shardmesh.topology import Topology
        print(Topology.default(ModelConfig.from_dir(args.model), args.stages, args.expert_servers).to_toml())
        return 0
    return 2


def _tls_files(args: argparse.Namespace, no_auth: bool = False):
    """`up`'s TLS flags: none, or all three (its services verify each other by the CA), and
    --tls-clients-without-certificates for the router's clients (they then need the token)."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    without_certificates = args.tls_clients_without_certificates
    if not any(given):
        if without_certificates:
            raise SystemExit("shardmesh up: --tls-clients-without-certificates needs --tls-cert, --tls-key and --tls-ca")
        return None
    if not all(given):
        raise SystemExit("shardmesh up: give --tls-cert, --tls-key and --tls-ca together (see `shardmesh certs`)")
    if without_certificates and no_auth:
        raise SystemExit("shardmesh up: --tls-clients-without-certificates needs tokens: it contradicts --no-auth")
    from shardmesh.mesh_secrets import TlsFiles
    return TlsFiles(*(path.absolute() for path in given), clients_without_certificates=without_certificates)


if __name__ == "__main__":
    sys.exit(main())
