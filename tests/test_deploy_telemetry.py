"""Generated deploy files with the topology's [telemetry] `collector` and `prometheus`: an
OpenTelemetry collector service and a Prometheus scraping every service (shardmesh.deploy_telemetry),
in compose (the compose specification's schema, docker-compose v1 `config`) and Kubernetes
(kubernetes-validate, strict); each Prometheus config checked by Debian's `promtool check config`.
And Kubernetes pods follow a server's `device` in the topology, as compose does."""

import pathlib
import shutil
import subprocess

import pytest
import yaml

from shardmesh import deploy_common
from shardmesh.cli import main as shardmesh_main
from shardmesh.deploy_compose import compose_yaml
from shardmesh.deploy_k8s import render
from shardmesh.deploy_telemetry import COLLECTOR_IMAGE, PROMETHEUS_IMAGE, compose_config_files
from shardmesh.mesh_settings import MeshSettings

from test_deploy import DEPLOY, check_jsonschema, compose_config, kubernetes_validate, load_k8s

SERVERS = (DEPLOY / "topology.toml").read_text().split("[telemetry]")[0]  # the demo's servers
TELEMETRY = """[telemetry]
metrics_port = 9464
otlp_endpoint = "otel-collector:4318"
collector = true
prometheus = true
"""
SERVICES = ["router", "stage-0", "stage-1", "experts-a", "experts-b"]


def promtool(config: pathlib.Path) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    assert path, "promtool (Debian's prometheus package) is missing: scripts/setup.sh installs it with apt as root"
    return subprocess.run([path, "check", "config", str(config)], capture_output=True, text=True, timeout=60)


def write_compose(tmp_path: pathlib.Path, topology_text: str) -> tuple[pathlib.Path, dict]:
    """The topology in tmp_path, the compose file in tmp_path/compose (as deploy/ lays them out), and
    the config files beside the topology, as `shardmesh compose` writes them."""
    (tmp_path / "topology.toml").write_text(topology_text)
    source = deploy_common.from_text(topology_text, "/models/demo")
    compose_file = tmp_path / "compose" / "observed.yaml"
    compose_file.parent.mkdir()
    compose_file.write_text(compose_yaml(source, "../topology.toml", "test"))
    for name, text in compose_config_files(source).items():
        (tmp_path / name).write_text(text)
    return compose_file, yaml.safe_load(compose_file.read_text())["services"]


def test_compose_gains_a_collector_and_a_prometheus_that_validate(tmp_path):
    compose_file, services = write_compose(tmp_path, SERVERS + TELEMETRY)
    assert list(services) == [*SERVICES, "otel-collector", "prometheus", "smoke"]
    for name in SERVICES:
        command = services[name]["command"]
        assert command[command.index("--otlp-endpoint") + 1] == "otel-collector:4318"
    assert services["otel-collector"]["image"] == COLLECTOR_IMAGE
    assert services["otel-collector"]["volumes"] == ["../otel-collector.yaml:/etc/otelcol/config.yaml:ro"]
    assert services["prometheus"]["image"] == PROMETHEUS_IMAGE
    assert services["prometheus"]["volumes"] == ["../prometheus.yml:/etc/prometheus/prometheus.yml:ro"]
    result = check_jsonschema(compose_file)
    assert result.returncode == 0, result.stdout + result.stderr
    result = compose_config(compose_file)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    assert "9090" in str(resolved["prometheus"]["ports"][0])  # published on the host (v1 keeps the short syntax)

    # Every service's containers are scraped at the metrics port, found by their DNS name.
    scrape = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["dns_sd_configs"] for job in scrape["scrape_configs"]}
    assert jobs == {name: [{"names": [name], "type": "A", "port": 9464}] for name in SERVICES}
    result = promtool(tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr

    # The collector receives OTLP/gRPC on the endpoint's port and runs one traces pipeline.
    collector = yaml.safe_load((tmp_path / "otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4318"
    pipeline = collector["service"]["pipelines"]["traces"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(collector[kind]), kind


def test_promtool_refuses_a_broken_scrape_config(tmp_path):
    """The check above can fail: a DNS record type Prometheus does not know is refused."""
    write_compose(tmp_path, SERVERS + TELEMETRY)
    broken = tmp_path / "broken.yml"
    broken.write_text((tmp_path / "prometheus.yml").read_text().replace("type: A", "type: AAAAA", 1))
    result = promtool(broken)
    assert result.returncode != 0 and "AAAAA" in result.stdout + result.stderr


def test_without_the_keys_nothing_is_added(tmp_path):
    _, services = write_compose(tmp_path, SERVERS + TELEMETRY.replace("collector = true\nprometheus = true\n", ""))
    assert list(services) == [*SERVICES, "smoke"]
    assert not (tmp_path / "prometheus.yml").exists() and not (tmp_path / "otel-collector.yaml").exists()
    source = deploy_common.from_text(SERVERS, "/models/demo")
    assert sorted(render(source, "test")) == sorted(p.name for p in (DEPLOY / "k8s" / "base").glob("*.yaml"))


def test_shardmesh_compose_writes_the_config_files_beside_the_topology(tmp_path, monkeypatch, capsys):
    (tmp_path / "topology.toml").write_text(SERVERS + TELEMETRY)
    monkeypatch.chdir(tmp_path)
    assert shardmesh_main(["compose", "--topology", "topology.toml", "--model-dir-in-container", "/m"]) == 0
    out, err = capsys.readouterr()
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in out
    assert "wrote prometheus.yml" in err and "wrote otel-collector.yaml" in err
    assert promtool(tmp_path / "prometheus.yml").returncode == 0


def test_kubernetes_base_gains_them_too_and_validates(tmp_path):
    source = deploy_common.from_text(SERVERS + TELEMETRY, "/models/demo")
    for name, text in render(source, "test").items():
        (tmp_path / name).write_text(text)
    files = sorted(p for p in tmp_path.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {"otel-collector.yaml", "prometheus.yaml"} <= {p.name for p in files}
    result = kubernetes_validate(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    docs = load_k8s(tmp_path)
    kustomization = next(d for d in docs if d["kind"] == "Kustomization")
    assert sorted(kustomization["resources"]) == [p.name for p in files]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["otel-collector"]["spec"]["ports"][0]["port"] == 4318  # the otlp_endpoint resolves to it
    prometheus = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "shardmesh-prometheus")
    assert prometheus["spec"]["template"]["spec"]["serviceAccountName"] == "shardmesh-prometheus"
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "shardmesh-prometheus")
    scrape = yaml.safe_load(config_map["data"]["prometheus.yml"])
    (job,) = scrape["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod", "namespaces": {"own_namespace": True}}]
    # Debian's Prometheus is built without Kubernetes discovery: promtool checks the rest (the
    # relabelling that picks annotated pods), with a static target in the discovery's place.
    job["static_configs"] = [{"targets": ["10.0.0.1:9464"]}]
    (tmp_path / "k8s-prometheus.yml").write_text(yaml.safe_dump(scrape))
    result = promtool(tmp_path / "k8s-prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # Every shardmesh pod carries the annotations that config keeps.
    pods = [d["spec"]["template"] for d in docs if d["kind"] == "Deployment"
            and d["metadata"]["labels"].get("shardmesh/server")]
    assert len(pods) == len(SERVICES)
    assert all(pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true" for pod in pods)


@pytest.mark.parametrize("telemetry, message", [
    ("collector = true\n", "collector = True: true adds the service 'otel-collector'"),
    ('otlp_endpoint = "jaeger:4317"\ncollector = true\n', "needs otlp_endpoint = \"otel-collector:4317\""),
    ("prometheus = true\n", "needs a metrics_port other than 0"),
    ("metrics_port = 0\nprometheus = true\n", "needs a metrics_port other than 0"),
    ('collector = "yes"\n', "collector = 'yes'"),
])
def test_the_keys_are_refused_without_what_they_need(telemetry, message):
    with pytest.raises(ValueError) as error:
        MeshSettings.from_toml(SERVERS + "[telemetry]\n" + telemetry)
    assert message in str(error.value)


def test_kubernetes_pods_follow_each_server_s_device(tmp_path):
    """`device = "cuda:N"` on a server: one nvidia.com/gpu and --device cuda:0 in its pod (the device
    plugin picks the GPU), without --gpu; `device = "cpu"` keeps a server off the GPU with --gpu."""
    text = SERVERS.replace('layers = [0, 2]\n', 'layers = [0, 2]\ndevice = "cuda:1"\n', 1)
    text = text.replace('name = "experts-b"\n', 'name = "experts-b"\ndevice = "cpu"\n', 1)
    source = deploy_common.from_text(text, "/models/demo")
    for gpu in (False, True):
        out = tmp_path / f"gpu-{gpu}"
        out.mkdir()
        for name, rendered in render(source, "test", gpu=gpu).items():
            (out / name).write_text(rendered)
        result = kubernetes_validate(*sorted(p for p in out.glob("*.yaml") if p.name != "kustomization.yaml"))
        assert result.returncode == 0, result.stdout + result.stderr
        containers = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
                      for d in load_k8s(out) if d["kind"] == "Deployment"}
        on_gpu = {"stage-0"} | ({"stage-1", "experts-a"} if gpu else set())
        for name in SERVICES[1:]:
            container = containers[f"shardmesh-{name}"]
            limits = container.get("resources", {}).get("limits", {})
            assert (limits.get("nvidia.com/gpu") == 1) == (name in on_gpu), (gpu, name)
            assert ("cuda:0" in container["args"]) == (name in on_gpu), (gpu, name)
            assert container["args"][container["args"].index("--dtype") + 1] == "bfloat16"  # one dtype for all
            assert container["image"] == "shardmesh:cuda"
