"""The topology file's [telemetry] and [auto_rebalance] tables drive `shardmesh up`, the compose
file and the Kubernetes manifests alike: every service gets the same metrics, tracing and
auto-rebalance flags; files generated with them still pass the compose specification, docker-compose
v1 and Kubernetes' schemas; and the kustomize base, rendered by hand as kustomize would (its
resources in order; it has no patches), validates as one stream whose references resolve."""

import shutil
import subprocess

import pytest
import yaml

from shardmesh import deploy_common
from shardmesh.config import ModelConfig
from shardmesh.deploy_compose import compose
from shardmesh.deploy_k8s import render
from shardmesh.launcher import Launcher
from shardmesh.mesh_settings import MeshSettings
from shardmesh.topology import Topology

from test_deploy import DEPLOY, K8S_BASE, check_jsonschema, compose_config, kubernetes_validate

SETTINGS = """
[telemetry]
metrics_port = 9464
otlp_endpoint = "otel-collector:4317"
trace_sample_ratio = 0.25

[auto_rebalance]
threshold = 1.3
interval_seconds = 20
"""
TELEMETRY_FLAGS = ["--metrics-port", "9464", "--otlp-endpoint", "otel-collector:4317", "--trace-sample-ratio", "0.25"]
ROUTER_FLAGS = TELEMETRY_FLAGS + ["--auto-rebalance", "1.3", "--auto-rebalance-interval", "20.0"]


def server_topology() -> str:
    """deploy/topology.toml's servers, without its own settings."""
    text = (DEPLOY / "topology.toml").read_text()
    return text[:text.index("[telemetry]")]


def test_settings_become_each_roles_flags():
    settings = MeshSettings.from_toml(server_topology() + SETTINGS)
    assert settings.service_args("router") == ROUTER_FLAGS
    assert settings.service_args("stage") == settings.service_args("expert") == TELEMETRY_FLAGS
    assert settings.service_args("stage", metrics_port=9470)[:2] == ["--metrics-port", "9470"]
    assert MeshSettings.from_toml(server_topology()).service_args("router") == []  # none: all off
    no_otlp = MeshSettings.from_toml("[telemetry]\nmetrics_port = 0\ntrace_sample_ratio = 0.5\n")
    assert no_otlp.service_args("expert") == ["--metrics-port", "0"]  # a ratio means nothing without tracing


@pytest.mark.parametrize("table, message", [
    ("[telemetry]\nmetrics_port = 70000", "metrics_port 70000"),
    ("[telemetry]\notlp_endpoint = \"collector\"", "otlp_endpoint 'collector' is not host:port"),
    ("[telemetry]\ntrace_sample_ratio = 0", "trace_sample_ratio 0.0 is not in (0, 1]"),
    ("[telemetry]\nmetrics_prot = 9464", "unknown keys ['metrics_prot']"),
    ("[auto_rebalance]\nthreshold = 1.0", "threshold 1.0 must be > 1"),
    ("[auto_rebalance]\ninterval_seconds = 5", "[auto_rebalance] needs a threshold"),
    ("[[telemetry]]\nmetrics_port = 1", "[telemetry] must be one table"),
])
def test_bad_settings_are_refused_naming_the_key(table, message):
    text = server_topology() + table + "\n"
    with pytest.raises(ValueError) as error:
        MeshSettings.from_toml(text)
    assert message in str(error.value)
    with pytest.raises(ValueError):  # services and generators read the file through Topology: refused there too
        Topology.from_toml(text, 4)


def test_compose_and_kubernetes_files_carry_the_settings(tmp_path):
    source = deploy_common.from_text(server_topology() + SETTINGS, "/models/demo")
    services = compose(source, "./topology.toml")["services"]
    for name, service in services.items():
        if name == "smoke":
            continue
        command = service["command"]
        flags = ROUTER_FLAGS if name == "router" else TELEMETRY_FLAGS
        start = command.index("--metrics-port")
        assert command[start:start + len(flags)] == flags, name
    compose_file = tmp_path / "compose" / "observed.yaml"
    compose_file.parent.mkdir()
    compose_file.write_text(deploy_common.header("test") + deploy_common.to_yaml({"services": services}))
    result = check_jsonschema(compose_file)
    assert result.returncode == 0, result.stdout + result.stderr
    result = compose_config(compose_file)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["services"]["router"]["command"][-len(ROUTER_FLAGS) - 2:-2] == ROUTER_FLAGS

    k8s = tmp_path / "k8s"
    k8s.mkdir()
    for name, text in render(source, "test").items():
        (k8s / name).write_text(text)
    result = kubernetes_validate(*sorted(p for p in k8s.glob("*.yaml") if p.name != "kustomization.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    deployments = [d for p in k8s.glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d["kind"] == "Deployment"]
    assert len(deployments) == 5
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert {"name": "metrics", "containerPort": 9464} in container["ports"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464"
        assert "--otlp-endpoint" in container["args"]
        assert ("--auto-rebalance" in container["args"]) == (container["name"] == "router")


def test_shardmesh_up_gives_each_service_the_settings_and_its_own_metrics_port(mixtral_dir, tmp_path):
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(Topology.default(ModelConfig.from_dir(mixtral_dir)).to_toml() + SETTINGS)
    launcher = Launcher(mixtral_dir, topology_file, no_auth=True)
    commands = {name: launcher.command(name, role) for name, role in
                [("router", "router"), ("stage-0", "stage"), ("stage-1", "stage"), ("experts-a", "expert")]}
    assert launcher.metrics_ports == {"router": 9464, "stage-0": 9465, "stage-1": 9466, "experts-a": 9467}
    for name, command in commands.items():
        flags = ROUTER_FLAGS if name == "router" else TELEMETRY_FLAGS
        flags = ["--metrics-port", str(launcher.metrics_ports[name]), *flags[2:]]
        start = command.index("--metrics-port")
        assert command[start:start + len(flags)] == flags, name


def hand_rendered_kustomization(base) -> list[dict]:
    """What `kustomize build base` gives for a kustomization that only lists resources: their
    documents in order. Anything else in it (patches, name prefixes, generators) is refused, so
    that this rendering cannot silently fall behind the base."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, sorted(kustomization)
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((base / name).read_text())]


def test_the_kustomize_base_renders_to_one_valid_stream_whose_references_resolve(tmp_path):
    docs = hand_rendered_kustomization(K8S_BASE)
    stream = tmp_path / "built.yaml"
    stream.write_text("---\n".join(yaml.safe_dump(doc) for doc in docs))
    result = kubernetes_validate(stream)
    assert result.returncode == 0 and result.stdout.count("passed") == len(docs), result.stdout + result.stderr
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(set(names)) == len(names), names
    pods = [d["spec"]["template"] for d in docs if d["kind"] == "Deployment"]
    for pod in pods:
        for volume in pod["spec"]["volumes"]:
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= pod["metadata"]["labels"].items() for pod in pods), service["metadata"]["name"]
    kubectl = shutil.which("kubectl")
    if kubectl:  # where kubectl is installed (not in CI), its kustomize must agree with the rendering above
        built = subprocess.run([kubectl, "kustomize", str(K8S_BASE)], capture_output=True, text=True, timeout=120)
        assert built.returncode == 0, built.stderr
        key = lambda d: (d["kind"], d["metadata"]["name"])
        assert sorted(yaml.safe_load_all(built.stdout), key=key) == sorted(docs, key=key)
