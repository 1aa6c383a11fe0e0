"""The `shardmesh` command line.

    shardmesh demo                     make a small model, run a mesh, generate, check against transformers
    shardmesh up --model DIR           every service of a topology as local processes
    shardmesh router|stage|expert ...  one service (what a container runs)
    shardmesh generate --router ADDR   stream a generation (needs only grpcio + protobuf)
    shardmesh make-checkpoint DIR      a seeded random checkpoint (needs transformers)
    shardmesh topology --model DIR     print the default topology for a model

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
    up.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    up.add_argument("--threads", type=int, default=1, help="torch threads per service")
    up.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    from shardmesh.serve import add_service_arguments
    for role in ("router", "stage", "expert"):
        add_service_arguments(commands.add_parser(role, help=f"run one {role} service"), role)

    from shardmesh.cli_generate import add_parser as add_generate
    add_generate(commands)

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
        from shardmesh.serve import run_service
        return run_service(args.command, args)
    if args.command == "up":
        from shardmesh.launcher import run_up
        return run_up(args.model, args.topology, args.host, args.dtype, args.threads, args.log_level)
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


if __name__ == "__main__":
    sys.exit(main())
