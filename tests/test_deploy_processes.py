"""deploy/compose/cpu.yaml, run without a container engine: each service's exact command and
environment (as `docker-compose config` resolves them) as a local process, experts-a scaled to
two replicas as `docker compose up --scale experts-a=2` would, then health checks, the smoke
job and SDK generations checked against transformers. The same for the compose file generated
from that topology with stage-1 at tp = 2: a service per shard, whose group forms through the
router (no rendezvous in any command line).

What Docker would provide is emulated by rewriting the command lines, and nothing else:
- DNS and ports: every container has its own address and listens on 50051; here every process
  shares loopback, so each instance gets its own free port, and "NAME:50051" (a service name,
  as the embedded DNS resolves it), "{ip}:50051" / "127.0.0.1:50051" (the container itself) and
  "--port 50051" become 127.0.0.1 and that instance's port; "--host 0.0.0.0" becomes 127.0.0.1
  (tests listen on loopback only);
- a container's host name ("{hostname}", a container id in Docker) becomes a unique name per
  instance;
- bind mounts: an argument under a mount's target path becomes the same path under its source.
The rewrite is checked to leave no 50051, 0.0.0.0 or placeholder behind."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from shardmesh.checkpoint_maker import DEMO_CONFIG
from shardmesh.cli_health import check
from shardmesh.client import Client
from shardmesh.deploy_common import PORT, from_text
from shardmesh.deploy_compose import compose_yaml
from shardmesh.mesh_settings import MeshSettings
from shardmesh.reference import transformers_greedy
from shardmesh.tp_group import free_port

from test_deploy import COMPOSE_ENV, DEPLOY, compose_config

METRICS_PORT = MeshSettings.from_toml((DEPLOY / "topology.toml").read_text()).metrics_port

pytestmark = pytest.mark.slow
SHARDMESH = [sys.executable, "-m", "shardmesh.cli"]
TP_TOPOLOGY = (DEPLOY / "topology.toml").read_text().replace("layers = [2, 4]\n", "layers = [2, 4]\ntp = 2\n", 1)
PROMPTS = [[1, 9, 27, 81], [5, 7, 11, 13, 17, 19], [300, 2, 44]]
NEW_TOKENS = 8


class Instance:
    """One container of one service: its identity and its command lines, rewritten."""

    def __init__(self, service: str, index: int, spec: dict):
        self.service, self.spec = service, spec
        self.hostname = f"{service}-{index}"
        self.port = free_port()
        self.metrics_port = free_port()  # every container serves metrics on the topology's metrics_port
        self.process: subprocess.Popen | None = None

    def rewrite(self, args: list[str], ports: dict[str, int]) -> list[str]:
        out = []
        for previous, arg in zip([None, *args], args, strict=False):  # (the argument before, the argument)
            for volume in self.spec.get("volumes", []):
                source, target = volume.split(":")[:2]
                if arg == target or arg.startswith(target + "/"):
                    arg = source + arg[len(target):]
            host, _, port = arg.rpartition(":")
            if port == str(PORT) and host in ports:
                arg = f"127.0.0.1:{ports[host]}"
            elif port == str(PORT) and host in ("{ip}", "127.0.0.1"):
                arg = f"127.0.0.1:{self.port}"
            elif previous == "--port" and arg == str(PORT):
                arg = str(self.port)
            elif previous == "--metrics-port":
                assert arg == str(METRICS_PORT), arg
                arg = str(self.metrics_port)
            elif previous == "--host" and arg == "0.0.0.0":
                arg = "127.0.0.1"
            arg = arg.replace("{hostname}", self.hostname)
            assert not any(s in arg for s in (str(PORT), str(METRICS_PORT), "0.0.0.0", "{ip}", "{hostname}")), arg
            out.append(arg)
        return out

    def start(self, ports: dict[str, int], log_dir: pathlib.Path) -> None:
        env = {**os.environ, **{k: str(v) for k, v in self.spec.get("environment", {}).items()}}
        log = open(log_dir / f"{self.hostname}.log", "wb")
        self.process = subprocess.Popen([*SHARDMESH, *self.rewrite(self.spec["command"], ports)], env=env,
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def healthcheck(self, ports: dict[str, int]) -> subprocess.CompletedProcess:
        """The service's own health check command, as Docker would run it in the container."""
        test = self.spec["healthcheck"]["test"]
        assert test[:2] == ["CMD", "shardmesh"], test
        return subprocess.run([*SHARDMESH, *self.rewrite(test[2:], ports)], capture_output=True, text=True,
                              timeout=30)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def wait_healthy(instances: list[Instance], ports: dict[str, int], log_dir: pathlib.Path, timeout: float) -> None:
    """Poll grpc.health.v1 in this process (cheap) until SERVING, then run each instance's own
    health check command once: it must exit 0 (a fresh process per poll would slow the loading
    services down on a small machine)."""
    deadline = time.monotonic() + timeout
    waiting = list(instances)
    while waiting:
        for instance in waiting:
            if instance.process.poll() is not None:
                log = (log_dir / f"{instance.hostname}.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{instance.hostname} exited with {instance.process.returncode}:\n{log}")
        waiting = [i for i in waiting if not check(f"127.0.0.1:{i.port}", timeout=2)[0]]
        assert time.monotonic() < deadline, f"not healthy after {timeout} s: {[i.hostname for i in waiting]}"
        time.sleep(0.2 if waiting else 0)
    for instance in instances:
        result = instance.healthcheck(ports)
        assert result.returncode == 0, f"{instance.hostname}: {result.stdout} {result.stderr}"


def compose_file_of(variant: str, directory: pathlib.Path) -> tuple[pathlib.Path, dict[str, int]]:
    """(the compose file, replicas per service to start where not 1)."""
    if variant == "committed":
        return DEPLOY / "compose" / "cpu.yaml", {"experts-a": 2}
    assert "tp = 2" in TP_TOPOLOGY
    (directory / "topology.toml").write_text(TP_TOPOLOGY)
    compose_file = directory / "compose.yaml"
    compose_file.write_text(compose_yaml(from_text(TP_TOPOLOGY, "/models/demo"), "./topology.toml", "test"))
    return compose_file, {}  # experts-a's scaling is covered above: one process less on a small machine


@pytest.mark.parametrize("variant", ["committed", "tp"])
def test_compose_services_run_as_processes_and_generate_exact_tokens(variant, make_model_dir, tmp_path):
    model_dir = make_model_dir(**DEMO_CONFIG)
    compose_file, scale = compose_file_of(variant, tmp_path)
    environment = dict(COMPOSE_ENV, SHARDMESH_MODEL_DIR=str(model_dir))
    resolved = compose_config(compose_file, "--profile", "smoke", environment=environment)
    assert resolved.returncode == 0, resolved.stderr
    services = yaml.safe_load(resolved.stdout)["services"]
    smoke = services.pop("smoke")
    if variant == "tp":  # rank 1 is its own service; nobody is given a rendezvous: the router hands it out
        assert sorted(services) == ["experts-a", "experts-b", "router", "stage-0", "stage-1", "stage-1-tp1"]
        assert services["stage-1-tp1"]["command"][services["stage-1-tp1"]["command"].index("--name") + 1] == \
            "stage-1/tp1"
        assert not any("--tp-rendezvous" in spec["command"] for spec in services.values())
    instances = {name: [Instance(name, k + 1, spec) for k in range(scale.get(name, 1))]
                 for name, spec in services.items()}
    ports = {name: replicas[0].port for name, replicas in instances.items()}  # what the DNS answers
    everything = [i for replicas in instances.values() for i in replicas]
    try:
        instances["router"][0].start(ports, tmp_path)
        for name, replicas in instances.items():
            if name != "router":
                assert services[name]["depends_on"] == {"router": {"condition": "service_started"}}
                for instance in replicas:
                    instance.start(ports, tmp_path)
        wait_healthy([i for i in everything if i.service != "router"], ports, tmp_path, timeout=180)
        wait_healthy(instances["router"], ports, tmp_path, timeout=60)  # healthy = every server registered

        assert smoke["depends_on"] == {"router": {"condition": "service_healthy"}}
        smoke_run = subprocess.run([*SHARDMESH, *Instance("smoke", 1, smoke).rewrite(smoke["command"], ports)],
                                   env={**os.environ, **smoke["environment"]}, capture_output=True, text=True,
                                   timeout=120)
        assert smoke_run.returncode == 0, smoke_run.stderr
        prompt = [int(t) for t in smoke["command"][smoke["command"].index("--prompt-ids") + 1].split(",")]
        new_tokens = int(smoke["command"][smoke["command"].index("--max-new-tokens") + 1])
        expected = transformers_greedy(model_dir, prompt, new_tokens, ignore_eos=True)
        assert [int(t) for t in smoke_run.stdout.split()] == expected

        with Client(f"127.0.0.1:{ports['router']}", timeout=60, token=environment["SHARDMESH_AUTH_TOKEN"]) as client:
            status = client.cluster_status()
            experts_a = next(s for s in status.servers if s.name == "experts-a")
            assert sorted(experts_a.replica_addresses) == sorted(f"127.0.0.1:{i.port}" for i in instances["experts-a"])
            stage_1 = next(s for s in status.servers if s.name == "stage-1")
            assert [(shard.rank, shard.shard_id) for shard in stage_1.tp_shards] == (
                [(0, "stage-1"), (1, "stage-1-tp1")] if variant == "tp" else [])
            for prompt in PROMPTS:
                tokens = client.generate_all(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
                assert list(tokens) == transformers_greedy(model_dir, prompt, NEW_TOKENS, ignore_eos=True), prompt
        # Observable as deployed: the topology's [telemetry] gave every container a metrics endpoint.
        assert "--auto-rebalance" in services["router"]["command"]  # and its [auto_rebalance] the router's flags
        router_metrics = scrape(instances["router"][0].metrics_port)
        assert re.search(r"^shardmesh_output_tokens_total\S* [1-9]", router_metrics, re.M), router_metrics[-2000:]
        expert_metrics = "".join(scrape(i.metrics_port) for i in instances["experts-a"])
        assert re.search(r'^shardmesh_expert_tokens_total\{[^}]*server="experts-a"[^}]*\} [1-9]', expert_metrics, re.M)
    finally:
        # The router first: its streams to the stages end, so they stop without waiting out a grace.
        for instance in sorted(everything, key=lambda i: i.service != "router"):
            if instance.process is not None and instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
                if instance.service == "router":
                    try:
                        instance.process.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        pass
        for instance in everything:
            if instance.process is not None:
                try:
                    instance.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    instance.process.kill()
                    instance.process.wait()
    assert all(i.process.returncode == 0 for i in everything), {i.hostname: i.process.returncode for i in everything}
