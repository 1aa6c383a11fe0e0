"""Regenerate the deployment files in deploy/ from the demo's default topology.

    python scripts/gen_deploy.py           write deploy/topology.toml, deploy/compose/*.yaml, deploy/k8s/base/*
    python scripts/gen_deploy.py --check   exit 1 if any committed file differs (tests/test_deploy.py does this too)

deploy/topology.toml is `shardmesh topology` of the demo model (shardmesh.checkpoint_maker.DEMO_CONFIG)
with DEMO_SETTINGS ([telemetry], [auto_rebalance]) after it;
every other file is generated from it by the same code as `shardmesh compose` / `shardmesh k8s`, with the
command line written in its header (run from the file's own directory, it prints the same bytes)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL_DIR_IN_CONTAINER = "/models/demo"
COMPOSE_FILES = {  # file -> (--gpus, --expert-gpus)
    "deploy/compose/cpu.yaml": ([], []),                     # CPU; scale an expert service with --scale
    "deploy/compose/multi-gpu.yaml": (["0", "1"], ["2", "3"]),  # one host, four GPUs
}
K8S_BASE = "deploy/k8s/base"


def demo_topology_toml() -> str:
    from shardmesh.checkpoint_maker import DEMO_CONFIG
    from shardmesh.config import ModelConfig
    from shardmesh.topology import Topology

    demo = DEMO_CONFIG  # only the shape matters to the topology: layers and experts
    config = ModelConfig(family=demo["family"], vocab_size=demo["vocab_size"], hidden_size=demo["hidden_size"],
                         intermediate_size=demo["intermediate_size"], num_layers=demo["num_hidden_layers"],
                         num_attention_heads=demo["num_attention_heads"],
                         num_key_value_heads=demo["num_key_value_heads"],
                         head_dim=demo["hidden_size"] // demo["num_attention_heads"], rms_norm_eps=1e-5, rope_theta=1e4,
                         max_position_embeddings=demo["max_position_embeddings"], tie_word_embeddings=False,
                         num_experts=demo["num_local_experts"], experts_per_token=demo["num_experts_per_tok"])
    return Topology.default(config).to_toml() + DEMO_SETTINGS


# The demo mesh's settings (shardmesh.mesh_settings): metrics on every service, traces once a
# collector is named, experts re-placed when the load stays skewed. Edit deploy/topology.toml's
# copy through here: every generated file follows.
DEMO_SETTINGS = """[telemetry]
metrics_port = 9464
# otlp_endpoint = "otel-collector:4317"  # name an OTLP/gRPC collector to trace requests
trace_sample_ratio = 0.1

[auto_rebalance]
threshold = 1.5
interval_seconds = 30
"""


def generate() -> dict[str, str]:
    """Repository-relative path -> the text it must hold."""
    from shardmesh.cli_deploy import command_line, relative_topology_path
    from shardmesh.deploy_common import from_text
    from shardmesh.deploy_compose import compose_yaml
    from shardmesh.deploy_k8s import render

    topology_text = demo_topology_toml()
    source = from_text(topology_text, MODEL_DIR_IN_CONTAINER)
    files = {"deploy/topology.toml": topology_text}
    for path, (gpus, expert_gpus) in COMPOSE_FILES.items():
        relative = relative_topology_path("deploy/topology.toml", path)
        argv = ["compose", "--topology", relative, "--model-dir-in-container", MODEL_DIR_IN_CONTAINER]
        if gpus:
            argv += ["--gpus", ",".join(gpus)]
        if expert_gpus:
            argv += ["--expert-gpus", ",".join(expert_gpus)]
        files[path] = compose_yaml(source, relative, command_line(argv), gpus=gpus, expert_gpus=expert_gpus)
    relative = relative_topology_path("deploy/topology.toml", K8S_BASE + "/kustomization.yaml")
    argv = ["k8s", "--topology", relative, "--model-dir-in-container", MODEL_DIR_IN_CONTAINER, "--out", "."]
    for name, text in render(source, command_line(argv)).items():
        files[f"{K8S_BASE}/{name}"] = text
    return files


def main() -> int:
    sys.path.insert(0, str(ROOT))
    files = generate()
    if "--check" in sys.argv[1:]:
        stale = [p for p, text in files.items() if not (ROOT / p).exists() or (ROOT / p).read_text() != text]
        for path in stale:
            print(f"stale: {path} (run python scripts/gen_deploy.py)")
        return 1 if stale else 0
    for path, text in files.items():
        (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / path).write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
