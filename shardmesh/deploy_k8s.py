"""Kubernetes manifests (a kustomize base) generated from a topology file, so they cannot drift.

    kustomization.yaml   lists everything below
    topology.yaml        ConfigMap `shardmesh-topology`: the topology file, mounted in every pod
    model-volume.yaml    PersistentVolumeClaim `shardmesh-model` (ReadOnlyMany): bind it to a
                         volume that holds the checkpoint
    router.yaml          Deployment (one replica: it owns the cluster map) + Service
                         `shardmesh-router` for clients (ready = SERVING) + Service
                         `shardmesh-registry` for servers registering (not-ready addresses too:
                         the router is SERVING only after they have registered)
    <server>.yaml        one Deployment per stage (one replica, Recreate) and per expert server
                         (scale it: `kubectl scale deployment/shardmesh-experts-a --replicas=3`);
                         a stage's standbys (topology `standbys = N`): one each, <stage>-standby-N,
                         registering as replica standby-N of the stage; a tensor-parallel
                         stage (topology `tp = T`): one per shard, rank 0 <stage>, rank R
                         <stage>-tpR (`--name <stage>/tpR`), each with its own GPU with --gpu
                         or `device`; rank 0 binds the group's store on a port the OS chooses at
                         its pod IP and the router hands that address to the other ranks

Tokens come from the Secret `shardmesh-tokens` (keys `auth-token`, `internal-token`), which
the base does not hold: create it first (see the README). Stages and experts advertise their
pod IP (downward API) and experts register with their pod name as replica id. Probes are
Kubernetes' own gRPC probes on grpc.health.v1 (the router's liveness is a TCP probe: it is
NOT_SERVING, rightly, until every server has registered). Pod templates carry the topology's
sha256, so changing the topology rolls every pod. The topology file's [telemetry] and
[auto_rebalance] (shardmesh.mesh_settings) become every container's flags; with a metrics_port
each container names it `metrics` and each pod carries the prometheus.io/scrape annotations."""

from shardmesh.deploy_common import (PORT, TOPOLOGY_IN_CONTAINER, DeploySource, check_shard_devices, header,
                                     server_containers, to_yaml)
from shardmesh.deploy_telemetry import k8s_files
from shardmesh.security import CLIENT_TOKEN_ENV, INTERNAL_TOKEN_ENV

APP = "shardmesh"
USER_ID = 10001  # the image's `shardmesh` user (deploy/Dockerfile)


def _labels(component: str, server: str) -> dict:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component, "shardmesh/server": server}


def _secret_env(variable: str, key: str) -> dict:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": f"{APP}-tokens", "key": key}}}


def _container(source: DeploySource, name: str, args: list[str], image: str, gpu: bool, probes: dict) -> dict:
    if name == "router":  # the only server that registers nowhere, and the only one clients call
        env = [_secret_env(CLIENT_TOKEN_ENV, "auth-token")]
    else:  # what --advertise $(POD_IP) and --replica-id $(POD_NAME) read
        env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
               {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    container = {
        "name": name, "image": image, "args": args,
        "env": env + [_secret_env(INTERNAL_TOKEN_ENV, "internal-token")],
        "ports": [{"name": "grpc", "containerPort": PORT}] + _metrics_ports(source),
        **probes,
        "volumeMounts": [{"name": "model", "mountPath": source.model_dir_in_container, "readOnly": True},
                         {"name": "topology", "mountPath": TOPOLOGY_IN_CONTAINER.rsplit("/", 1)[0], "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": USER_ID},
    }
    if gpu:
        container["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    return container


def _metrics_ports(source: DeploySource) -> list[dict]:
    port = source.settings.metrics_port  # [telemetry] metrics_port of the topology file
    return [] if port is None else [{"name": "metrics", "containerPort": port}]


def _scrape_annotations(source: DeploySource) -> dict:
    """The prometheus.io/* annotations that Prometheus' usual pod discovery config keeps."""
    port = source.settings.metrics_port
    return {} if port is None else {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                                    "prometheus.io/path": "/metrics"}


def _grpc_probes(startup_failures: int = 120) -> dict:
    grpc = {"grpc": {"port": PORT}}
    return {"startupProbe": {**grpc, "periodSeconds": 5, "failureThreshold": startup_failures},  # model load: 10 min
            "readinessProbe": {**grpc, "periodSeconds": 10},
            "livenessProbe": {**grpc, "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3}}


def _deployment(source: DeploySource, name: str, component: str, container: dict, recreate: bool) -> dict:
    labels = _labels(component, name)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": f"{APP}-{name}", "labels": labels},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate" if recreate else "RollingUpdate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {"shardmesh/topology-sha256": source.topology_sha256,
                                                             **_scrape_annotations(source)}},
                "spec": {"containers": [container], "volumes": [
                    {"name": "model", "persistentVolumeClaim": {"claimName": f"{APP}-model", "readOnly": True}},
                    {"name": "topology", "configMap": {"name": f"{APP}-topology"}}]},
            },
        },
    }


def _service(name: str, selector: dict, publish_not_ready: bool) -> dict:
    spec = {"selector": selector, "ports": [{"name": "grpc", "port": PORT, "targetPort": "grpc"}]}
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": selector}, "spec": spec}


def manifests(source: DeploySource, gpu: bool = False, image: str = "", dtype: str = "") -> dict[str, list[dict]]:
    """file name -> the resources in it (kustomization.yaml included, listing the others)."""
    # A server's `device` in the topology wins over --gpu: cuda:N -> one GPU (the device plugin picks
    # which: a pod cannot name GPU N; inside the container it is cuda:0), cpu -> none. One dtype for all.
    any_gpu = gpu or any(d.startswith("cuda") for _, d in source.topology.devices)
    image = image or f"shardmesh:{'cuda' if any_gpu else 'cpu'}"
    dtype = dtype or ("bfloat16" if any_gpu else "float32")
    files: dict[str, list[dict]] = {
        "topology.yaml": [{"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": f"{APP}-topology", "labels": {"app.kubernetes.io/name": APP}},
                           "data": {TOPOLOGY_IN_CONTAINER.rsplit("/", 1)[1]: source.topology_text}}],
        "model-volume.yaml": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                               "metadata": {"name": f"{APP}-model", "labels": {"app.kubernetes.io/name": APP}},
                               "spec": {"accessModes": ["ReadOnlyMany"],
                                        "resources": {"requests": {"storage": "10Gi"}}}}],
    }
    router_probes = _grpc_probes()
    router_probes["livenessProbe"] = {"tcpSocket": {"port": PORT}, "periodSeconds": 20, "failureThreshold": 3}
    router_probes["startupProbe"] = {"tcpSocket": {"port": PORT}, "periodSeconds": 5, "failureThreshold": 120}
    router = _container(source, "router", source.service_args("router", dtype), image, False, router_probes)
    router_labels = _labels("router", "router")
    files["router.yaml"] = [_deployment(source, "router", "router", router, recreate=True),
                            _service(f"{APP}-router", router_labels, publish_not_ready=False),
                            _service(f"{APP}-registry", router_labels, publish_not_ready=True)]
    gpus_of: dict[str, list[str]] = {}  # TP stage -> "any" (a GPU) | "" (CPU) per shard, checked below
    for container in server_containers(source):  # a stage's standbys: NAME-standby-N; TP shards: NAME-tpR
        spec, name, is_stage = container.spec, container.name, container.is_stage
        own = source.topology.device_of(container.server_name)
        server_gpu = own.startswith("cuda") if own else gpu
        args = source.service_args("stage" if is_stage else "expert", dtype, "cuda:0" if server_gpu else "")
        args += ["--name", container.server_name, "--router", f"{APP}-registry:{PORT}",
                 "--advertise", f"$(POD_IP):{PORT}"]
        if not is_stage:
            args += ["--replica-id", "$(POD_NAME)"]
        elif container.replica_id:
            args += ["--replica-id", container.replica_id]
        elif spec.tp > 1:  # the router gives the rendezvous: rank 0's store at its pod IP (router/tp_ranks.py)
            args += ["--tp-shard-id", name]  # the same across its pods (Recreate): keeps its rank
            gpus_of.setdefault(spec.name, []).append("any" if server_gpu else "")
        component = "stage" if is_stage else "expert"
        container_spec = _container(source, name, args, image, server_gpu, _grpc_probes())
        files[f"{name}.yaml"] = [_deployment(source, name, component, container_spec, recreate=is_stage)]
    for stage, shard_gpus in gpus_of.items():  # the device plugin gives each pod its own GPU
        check_shard_devices(stage, shard_gpus, distinct=False)
    files.update(k8s_files(source))  # [telemetry] collector / prometheus (shardmesh.deploy_telemetry)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": list(files)}
    return {"kustomization.yaml": [kustomization], **files}


def render(source: DeploySource, command: str, **options) -> dict[str, str]:
    """file name -> its text (multi-document YAML where a file holds several resources)."""
    return {name: header(command) + "---\n".join(to_yaml(resource) for resource in resources)
            for name, resources in manifests(source, **options).items()}
