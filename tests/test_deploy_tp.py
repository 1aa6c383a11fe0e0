"""Tensor-parallel stages (topology `tp = T`) in the generated compose file and Kubernetes
manifests: one container per shard (rank 0 keeps the stage's name, rank R is `NAME-tpR` started
as `--name NAME/tpR`), each with its own device, none given a rendezvous (the router hands out
rank 0's: router/tp_ranks.py); the files pass the same validators as deploy/
(tests/test_deploy.py); what the mesh cannot run is refused naming the stage.
tests/test_deploy_processes.py runs such a compose file's commands and checks the tokens."""

import pytest
import yaml

from shardmesh import deploy_common
from shardmesh.cli import main as shardmesh_main
from shardmesh.deploy_compose import compose_yaml
from shardmesh.deploy_k8s import render
from shardmesh.deploy_telemetry import compose_scrape_config
from test_deploy import DEPLOY, check_jsonschema, compose_config, kubernetes_validate

SERVERS = (DEPLOY / "topology.toml").read_text()
TP = SERVERS.replace("layers = [2, 4]\n", "layers = [2, 4]\ntp = 2\n", 1)
TP_DEVICES = TP.replace("tp = 2\n", 'tp = 2\ndevice = ["cuda:0", "cuda:1"]\n', 1)
SHARDS = {"stage-1": "stage-1", "stage-1-tp1": "stage-1/tp1"}  # container -> --name


def source(text: str) -> deploy_common.DeploySource:
    return deploy_common.from_text(text, "/models/demo")


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def reserved_gpus(service: dict) -> list[str]:
    return service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]


def write_compose(tmp_path, text: str, **options) -> dict:
    file = tmp_path / "compose.yaml"
    file.write_text(compose_yaml(source(text), "./topology.toml", "test", **options))
    for result in (check_jsonschema(file), compose_config(file)):
        assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load(file.read_text())["services"]


def test_compose_has_a_service_per_shard_each_on_its_own_gpu(tmp_path):
    assert "tp = 2" in TP and 'device = ["cuda:0", "cuda:1"]' in TP_DEVICES
    services = write_compose(tmp_path, TP_DEVICES)
    assert list(services) == ["router", "stage-0", "stage-1", "stage-1-tp1", "experts-a", "experts-b", "smoke"]
    for name, server_name in SHARDS.items():
        command = services[name]["command"]
        assert (arg(command, "--name"), arg(command, "--advertise")) == (server_name, f"{name}:50051")
        assert arg(command, "--tp-shard-id") == name  # the same across restarts: the router gives its rank back
        assert "--tp-rendezvous" not in command and "--tp-rank" not in command and "--replica-id" not in command
        assert arg(command, "--device") == "cuda:0"  # its one reserved GPU, inside its container
        assert services[name]["healthcheck"] == services["stage-0"]["healthcheck"]
    assert [reserved_gpus(services[name]) for name in SHARDS] == [["0"], ["1"]]  # the topology's device list
    assert "--tp-shard-id" not in services["stage-0"]["command"]
    # Without a device in the topology the shards take the next --gpus in turn, as stages do.
    services = write_compose(tmp_path, TP, gpus=["0", "1", "2"])
    assert [reserved_gpus(services[n]) for n in ("stage-0", "stage-1", "stage-1-tp1")] == [["0"], ["1"], ["2"]]
    services = write_compose(tmp_path, TP)  # CPU: no reservation, no --device
    assert all("deploy" not in services[n] and "--device" not in services[n]["command"] for n in SHARDS)


def test_every_shard_is_scraped():
    jobs = [job["job_name"] for job in compose_scrape_config(source(TP))["scrape_configs"]]
    assert jobs == ["router", "stage-0", "stage-1", "stage-1-tp1", "experts-a", "experts-b"]


def test_kubernetes_has_a_deployment_per_shard(tmp_path):
    files = render(source(TP_DEVICES), "test")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert {"stage-1.yaml", "stage-1-tp1.yaml"} <= set(yaml.safe_load(files["kustomization.yaml"])["resources"])
    selectors = []
    for name, server_name in SHARDS.items():
        deployment = yaml.safe_load(files[f"{name}.yaml"])
        assert deployment["metadata"]["name"] == f"shardmesh-{name}"
        assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two pods of one rank
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        assert args[0] == "stage" and arg(args, "--name") == server_name
        assert (arg(args, "--advertise"), arg(args, "--tp-shard-id")) == ("$(POD_IP):50051", name)
        assert "--tp-rendezvous" not in args and "--replica-id" not in args
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and arg(args, "--device") == "cuda:0"
        selectors.append(deployment["spec"]["selector"])
    assert selectors[0] != selectors[1]  # each Deployment its own pods
    stage_0 = yaml.safe_load(files["stage-0.yaml"])["spec"]["template"]["spec"]["containers"][0]
    assert "resources" not in stage_0 and "--tp-shard-id" not in stage_0["args"]  # no device: CPU
    result = kubernetes_validate(*sorted(p for p in tmp_path.glob("*.yaml") if p.name != "kustomization.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_what_the_mesh_cannot_run_is_refused_naming_the_stage():
    compose = lambda text, **options: compose_yaml(source(text), "./topology.toml", "test", **options)  # noqa: E731
    k8s = lambda text: render(source(text), "test")  # noqa: E731
    with_standbys = TP.replace("tp = 2\n", "tp = 2\nstandbys = 1\n", 1)
    mixed = TP.replace("tp = 2\n", 'tp = 2\ndevice = ["cuda:0", "cpu"]\n', 1)
    clash = TP.partition("[telemetry]")[0] + '\n[[expert_server]]\nname = "stage-1-tp1"\nexperts = [1]\n'
    for generate in (compose, k8s):
        with pytest.raises(ValueError, match="stage 'stage-1': standbys = 1 with tp = 2"):
            generate(with_standbys)
        with pytest.raises(ValueError, match=r"'stage-1'.*GPU each or all the CPU \(rank 0: (GPU 0|a GPU), rank 1: CPU"):
            generate(mixed)
        with pytest.raises(ValueError, match="'stage-1''s shard 'stage-1/tp1' would be container 'stage-1-tp1'"):
            generate(clash)
    # Compose names host GPUs: two shards on one GPU cannot both be NCCL ranks (k8s gives each pod its own).
    with pytest.raises(ValueError, match=r"stage 'stage-1'.*\(rank 0: GPU 1, rank 1: GPU 1\)"):
        compose(TP.replace("tp = 2\n", 'tp = 2\ndevice = "cuda:1"\n', 1))
    with pytest.raises(ValueError, match=r"stage 'stage-1'.*\(rank 0: GPU 0, rank 1: GPU 0\)"):
        compose(TP, gpus=["0"])
    compose(TP, gpus=["0", "1"])  # stage-0 on GPU 0, stage-1 on 1, stage-1/tp1 on 0 again: fine
    render(source(TP.replace("tp = 2\n", 'tp = 2\ndevice = "cuda:1"\n', 1)), "test")  # one GPU per pod


def test_the_command_line_reports_a_refusal(tmp_path, capsys):
    (tmp_path / "topology.toml").write_text(TP)
    base = ["--topology", str(tmp_path / "topology.toml"), "--model-dir-in-container", "/models/demo"]
    assert shardmesh_main(["compose", *base, "--gpus", "0"]) == 2  # both shards on GPU 0
    assert "shardmesh compose: topology: stage 'stage-1'" in capsys.readouterr().err
    (tmp_path / "topology.toml").write_text(TP.replace("tp = 2\n", "tp = 2\nstandbys = 1\n", 1))
    assert shardmesh_main(["k8s", *base, "--out", str(tmp_path / "k8s")]) == 2
    assert "shardmesh k8s: topology: stage 'stage-1': standbys = 1" in capsys.readouterr().err
    assert not (tmp_path / "k8s").exists()  # nothing written
