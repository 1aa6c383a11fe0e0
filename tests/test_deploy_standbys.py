"""Stage standbys (topology `standbys = N`) in the generated compose file and Kubernetes manifests:
one container each, `NAME-standby-N`, loading the stage's layers and registering as its replica
`standby-N`; the files pass the same validators as deploy/ (tests/test_deploy.py)."""

import pathlib

import pytest
import yaml

from shardmesh import deploy_common
from shardmesh.deploy_compose import compose_yaml
from shardmesh.deploy_k8s import render
from test_deploy import DEPLOY, check_jsonschema, compose_config, kubernetes_validate

TOPOLOGY = (DEPLOY / "topology.toml").read_text().replace('layers = [2, 4]\n', 'layers = [2, 4]\nstandbys = 2\n', 1)


def source(text: str = TOPOLOGY) -> deploy_common.DeploySource:
    return deploy_common.from_text(text, "/models/demo")


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_compose_has_a_service_per_standby(tmp_path):
    assert "standbys = 2" in TOPOLOGY
    file = tmp_path / "compose.yaml"
    file.write_text(compose_yaml(source(), "./topology.toml", "test", gpus=["0", "1"]))
    services = yaml.safe_load(file.read_text())["services"]
    assert list(services) == ["router", "stage-0", "stage-1", "stage-1-standby-1", "stage-1-standby-2",
                              "experts-a", "experts-b", "smoke"]
    assert "--replica-id" not in services["stage-1"]["command"]
    for index, replica_id in enumerate(["standby-1", "standby-2"], start=2):
        service = services[f"stage-1-{replica_id}"]
        command = service["command"]
        assert (arg(command, "--name"), arg(command, "--replica-id")) == ("stage-1", replica_id)
        assert arg(command, "--advertise") == f"stage-1-{replica_id}:50051"  # its own DNS name
        assert service["healthcheck"] == services["stage-1"]["healthcheck"]
        # Stages and standbys take the --gpus in turn: each loads the layers on its own GPU.
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [str(index % 2)]
    result = check_jsonschema(file)
    assert result.returncode == 0, result.stdout + result.stderr
    result = compose_config(file)
    assert result.returncode == 0, result.stderr


def test_kubernetes_has_a_deployment_per_standby(tmp_path):
    files = render(source(), "test")
    assert {"stage-1-standby-1.yaml", "stage-1-standby-2.yaml"} <= set(files)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert "stage-1-standby-2.yaml" in kustomization["resources"]
    deployment = yaml.safe_load(files["stage-1-standby-2.yaml"])
    assert deployment["metadata"]["name"] == "shardmesh-stage-1-standby-2"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "stage" and (arg(args, "--name"), arg(args, "--replica-id")) == ("stage-1", "standby-2")
    active = yaml.safe_load(files["stage-1.yaml"])
    assert active["spec"]["selector"] != deployment["spec"]["selector"]  # each Deployment its own pods
    result = kubernetes_validate(*sorted(p for p in tmp_path.glob("*.yaml") if p.name != "kustomization.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_standby_name_taken_by_another_server_is_refused():
    servers = TOPOLOGY.partition("[telemetry]")[0]
    clash = servers + '\n[[expert_server]]\nname = "stage-1-standby-1"\nexperts = [1]\nlayers = [0, 4]\n'
    with pytest.raises(ValueError, match="'stage-1-standby-1', which is another server's name"):
        compose_yaml(source(clash), "./topology.toml", "test")
    with pytest.raises(ValueError, match="not a DNS label"):
        render(source(servers.replace('"stage-1"', '"s' + "x" * 55 + '"')), "test")


def test_committed_files_have_no_standbys():
    assert "standbys" not in (DEPLOY / "topology.toml").read_text()  # what the files above differ from
    assert not list(pathlib.Path(DEPLOY / "k8s" / "base").glob("*standby*"))
