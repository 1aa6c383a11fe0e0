"""docker-compose files generated from a topology file, so that the two cannot drift.

One service per topology server plus the router, all from one image (ENTRYPOINT `shardmesh`),
each listening on PORT inside its own container:

- `router` publishes PORT on the host's loopback (clients) and is healthy once every server of
  the topology has registered (grpc.health.v1 SERVING, asked by `shardmesh health`);
- each stage advertises its service name (`stage-0:50051`) and may be pinned to one GPU with a
  device reservation (inside its container that GPU is `cuda:0`);
- a stage's standbys (topology `standbys = N`) are services `NAME-standby-1` .. `NAME-standby-N`
  that load the same layers and register as its replicas `standby-1` ..; each takes the next GPU
  of `--gpus` (or the stage's own `device`);
- each shard of a tensor-parallel stage (topology `tp = T`) is a service: rank 0 keeps the stage's
  name, rank r is `NAME-tpR` (`--name NAME/tpR`), each advertising its service name, with a GPU
  of its own (the stage's `device` list, else the next of `--gpus`; a GPU each or all CPU) and
  `--tp-shard-id` its service name; no rendezvous is written: rank 0 binds the group's store on a
  port the OS chooses and the router hands `NAME:port` to the other ranks (router/tp_ranks.py).
  The shards' containers have their own /dev/shm, so they AllReduce over gloo (NCCL on GPUs);
- each expert server advertises `{ip}:50051` (its container's own address) and registers with
  `--replica-id {hostname}` (its container's id), so `docker compose up --scale experts-a=3` adds
  replicas that register with the router and take load;
- `smoke` (profile `smoke`) waits for the router to be healthy and generates a few tokens.

Tokens come from the environment of `docker compose` (SHARDMESH_AUTH_TOKEN for clients,
SHARDMESH_INTERNAL_TOKEN between services; both required); health checks need none.

The topology file's [telemetry] and [auto_rebalance] (shardmesh.mesh_settings) become every
service's flags: each container serves metrics on the same port (a Prometheus on the compose
network scrapes `NAME:PORT`; a scaled service's replicas are the DNS name's addresses).

With [telemetry] `collector` / `prometheus`: services `otel-collector` and `prometheus`
(shardmesh.deploy_telemetry), their config files beside the topology file.

Stages and experts start once the router has started (they retry registration until it
answers); nothing waits for the model to load but the router's health."""

from shardmesh.deploy_common import (PORT, TOPOLOGY_IN_CONTAINER, DeploySource, check_shard_devices, server_containers,
                                     to_yaml)
from shardmesh.deploy_telemetry import compose_services
from shardmesh.security import CLIENT_TOKEN_ENV, INTERNAL_TOKEN_ENV

MODEL_DIR_VARIABLE = "SHARDMESH_MODEL_DIR"
IMAGE_VARIABLE = "SHARDMESH_IMAGE"
SMOKE_PROMPT_IDS = "1,9,27,81"
SMOKE_NEW_TOKENS = 8


def healthcheck() -> dict:
    return {"test": ["CMD", "shardmesh", "health", "--address", f"127.0.0.1:{PORT}"],
            "interval": "5s", "timeout": "5s", "retries": 3, "start_period": "300s"}


def token_environment(*variables: str) -> dict:
    """Pass these token variables through from the host, refusing to start without them."""
    return {name: f"${{{name}:?set it to a secret string}}"
            for name in variables}


def gpu_reservation(gpu: str) -> dict:
    return {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}]}}}


def compose(source: DeploySource, topology_path: str, gpus: list[str] = (), expert_gpus: list[str] = (),
            dtype: str = "", image: str = "") -> dict:
    """The compose file as a dict. `topology_path`: the topology file as the compose file's
    directory sees it (a bind mount source); `gpus` go to stages in turn, `expert_gpus` to
    expert servers (none = CPU), unless the topology file gives a server its `device` (cuda:N: GPU N
    reserved, cuda:0 inside its container; cpu: none); dtype defaults to bfloat16 with GPUs, float32
    without."""
    any_gpu = bool(gpus or expert_gpus) or any(d.startswith("cuda") for _, d in source.topology.devices)
    dtype = dtype or ("bfloat16" if any_gpu else "float32")
    image = image or f"${{{IMAGE_VARIABLE}:-shardmesh:{'cuda' if any_gpu else 'cpu'}}}"
    volumes = [f"${{{MODEL_DIR_VARIABLE}:?set it to the checkpoint directory on this host}}:"
               f"{source.model_dir_in_container}:ro", f"{topology_path}:{TOPOLOGY_IN_CONTAINER}:ro"]
    router_address = f"router:{PORT}"
    services = {"router": {
        "image": image,
        "command": source.service_args("router", dtype) + ["--log-level", "INFO"],
        "environment": token_environment(CLIENT_TOKEN_ENV, INTERNAL_TOKEN_ENV),
        "volumes": volumes,
        "ports": [f"127.0.0.1:{PORT}:{PORT}"],
        "healthcheck": healthcheck(),
        "restart": "unless-stopped",
    }}
    stage_index = expert_index = 0
    gpus_of: dict[str, list[str]] = {}  # TP stage -> its shards' GPUs ("" = CPU), checked below
    for container in server_containers(source):
        spec, is_stage = container.spec, container.is_stage
        pool, index = (gpus, stage_index) if is_stage else (expert_gpus, expert_index)
        gpu = pool[index % len(pool)] if pool else ""
        own = source.topology.device_of(container.server_name)  # the topology file's `device` wins over the pools
        if own:
            gpu = own.partition(":")[2]  # "cuda:1" -> reserve GPU 1 ("cpu" -> none)
        stage_index, expert_index = stage_index + is_stage, expert_index + (not is_stage)
        command = source.service_args("stage" if is_stage else "expert", dtype, "cuda:0" if gpu else "")
        command += ["--name", container.server_name, "--router", router_address]
        if is_stage:
            command += ["--advertise", f"{container.name}:{PORT}"]
            command += ["--replica-id", container.replica_id] if container.replica_id else []
            if spec.tp > 1:  # the router gives the rendezvous: rank 0's store at its advertised host
                command += ["--tp-shard-id", container.name]  # the same across restarts: keeps its rank
                gpus_of.setdefault(spec.name, []).append(gpu)
        else:
            command += ["--advertise", f"{{ip}}:{PORT}", "--replica-id", "{hostname}"]
        service = {"image": image, "command": command + ["--log-level", "INFO"],
                   "environment": token_environment(INTERNAL_TOKEN_ENV), "volumes": volumes,
                   "depends_on": {"router": {"condition": "service_started"}},
                   "healthcheck": healthcheck(), "restart": "unless-stopped"}
        if gpu:
            service["deploy"] = gpu_reservation(gpu)
        services[container.name] = service
    for stage, shard_gpus in gpus_of.items():
        check_shard_devices(stage, shard_gpus)
    services.update(compose_services(source, topology_path))  # [telemetry] collector / prometheus
    services["smoke"] = {
        "image": image,
        "profiles": ["smoke"],
        "command": ["generate", "--router", router_address, "--prompt-ids", SMOKE_PROMPT_IDS,
                    "--max-new-tokens", str(SMOKE_NEW_TOKENS), "--ignore-eos", "--output", "ids", "--timeout", "60"],
        "environment": token_environment(CLIENT_TOKEN_ENV),
        "depends_on": {"router": {"condition": "service_healthy"}},
    }
    return {"services": services}


def compose_yaml(source: DeploySource, topology_path: str, command: str, **options) -> str:
    from shardmesh.deploy_common import header
    return header(command) + to_yaml(compose(source, topology_path, **options))
