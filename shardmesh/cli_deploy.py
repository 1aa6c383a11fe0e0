"""`shardmesh compose` and `shardmesh k8s`: deployment files generated from a topology file.

    shardmesh compose --topology topology.toml --model-dir-in-container /models/demo > compose.yaml
    shardmesh compose --topology topology.toml --model-dir-in-container /models/demo --gpus 0,1 --expert-gpus 2,3
    shardmesh k8s --topology topology.toml --model-dir-in-container /models/demo --out k8s/base

Write the compose file next to the topology file's path as given (it is bind-mounted from
there, relative to the compose file's directory). With [telemetry] `collector` / `prometheus`,
`compose` also writes otel-collector.yaml / prometheus.yml beside the topology file (mounted too). `--model DIR` validates the topology against
a checkpoint on this machine too; without it the router validates it when it starts.
Needs no torch (unless --model)."""

import argparse
import os
import pathlib
import shlex
import sys


def _gpu_list(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not all(i.isdigit() for i in ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids like 0,1, got {text!r}")
    return ids


def add_parsers(subparsers) -> None:
    for name, help_text in (("compose", "print a docker-compose file generated from a topology file"),
                            ("k8s", "write Kubernetes manifests (a kustomize base) generated from a topology file")):
        parser = subparsers.add_parser(name, help=help_text, description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--topology", required=True, type=pathlib.Path, help="topology TOML")
        parser.add_argument("--model-dir-in-container", required=True, metavar="PATH",
                            help="where the checkpoint is mounted in every container, e.g. /models/demo")
        parser.add_argument("--model", type=pathlib.Path, help="a local copy of the checkpoint to validate against")
        parser.add_argument("--image", default="", help="container image (default: shardmesh:cpu or shardmesh:cuda)")
        parser.add_argument("--dtype", default="", choices=["float32", "bfloat16", "float16"],
                            help="every service's dtype (default: bfloat16 with GPUs, float32 without)")
        if name == "compose":
            parser.add_argument("--gpus", type=_gpu_list, default=[], metavar="ID,...",
                                help="GPU ids for the stages, in turn (default: none, CPU)")
            parser.add_argument("--expert-gpus", type=_gpu_list, default=[], metavar="ID,...",
                                help="GPU ids for the expert servers, in turn (default: none, CPU)")
        else:
            parser.add_argument("--gpu", action="store_true", help="one GPU (nvidia.com/gpu) per stage and expert pod (a server's "
                                                                      "`device` in the topology wins: cuda:N one GPU, cpu none)")
            parser.add_argument("--out", required=True, type=pathlib.Path, help="directory to write the base into")


def command_line(argv: list[str]) -> str:
    return "shardmesh " + shlex.join(argv)


def relative_topology_path(topology_file: str, output_file: str) -> str:
    """The topology file's path as seen from the directory of `output_file` ("./x" or "../x")."""
    relative = os.path.relpath(topology_file, os.path.dirname(output_file) or ".")
    return relative if relative.startswith("../") else "./" + relative


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from shardmesh import deploy_common
    from shardmesh.deploy_compose import compose_yaml
    from shardmesh.deploy_k8s import render
    topology_path = str(args.topology)
    if not topology_path.startswith(("/", "./", "../")):
        topology_path = "./" + topology_path  # compose would read a bare name as a named volume
    try:  # what the mesh cannot run (e.g. two TP shards on one GPU) is refused naming the server, as a bad file
        source = deploy_common.load(args.topology, args.model_dir_in_container, args.model)
        if args.command == "compose":
            text = compose_yaml(source, topology_path, command_line(argv), gpus=args.gpus,
                                expert_gpus=args.expert_gpus, dtype=args.dtype, image=args.image)
        else:
            files = render(source, command_line(argv), gpu=args.gpu, image=args.image, dtype=args.dtype)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"shardmesh {args.command}: {error}", file=sys.stderr)
        return 2
    if args.command == "compose":
        sys.stdout.write(text)
        from shardmesh.deploy_telemetry import compose_config_files
        for name, text in compose_config_files(source).items():  # mounted from beside the topology file
            (args.topology.parent / name).write_text(text)
            print(f"wrote {args.topology.parent / name}", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0
