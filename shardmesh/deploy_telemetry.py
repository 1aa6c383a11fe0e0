"""The observability services that generated deploy files add when the topology's [telemetry]
asks (shardmesh.mesh_settings): `collector = true` adds an OpenTelemetry collector named
`otel-collector` that receives every service's traces over OTLP/gRPC (and prints them; point its
exporter at a tracing backend), `prometheus = true` a Prometheus that scrapes every service's
metrics_port.

- compose: services `otel-collector` and `prometheus` (its UI on the host's 127.0.0.1:9090). Their
  config files, `otel-collector.yaml` and `prometheus.yml`, sit beside the topology file (bind
  mounts, like it); `shardmesh compose` writes them there. Prometheus finds every container of a
  service by its DNS name (type A), so the replicas of a scaled expert service are all scraped.
- Kubernetes: the same as Deployments, Services and ConfigMaps in the base; Prometheus discovers
  the pods carrying the prometheus.io/scrape annotation in its own namespace (a Role lets it list
  pods), and labels each series with the pod's `shardmesh/server`.
Needs no torch."""

import posixpath

from shardmesh.deploy_common import DeploySource, server_containers, to_yaml
from shardmesh.mesh_settings import COLLECTOR_HOST

COLLECTOR_IMAGE = "otel/opentelemetry-collector:0.104.0"  # runs as uid 10001
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.1"                # runs as nobody (65534)
PROMETHEUS_PORT = 9090
COLLECTOR_CONFIG, PROMETHEUS_CONFIG = "otel-collector.yaml", "prometheus.yml"  # beside the topology file
COLLECTOR_CONFIG_IN_CONTAINER = "/etc/otelcol/config.yaml"
PROMETHEUS_CONFIG_IN_CONTAINER = "/etc/prometheus/prometheus.yml"
SCRAPE_INTERVAL = "15s"
APP = "shardmesh"


def _collector_port(source: DeploySource) -> int:
    return int(source.settings.otlp_endpoint.rpartition(":")[2])


def collector_config(source: DeploySource) -> dict:
    """The collector's configuration: OTLP/gRPC in on the otlp_endpoint's port, batched, printed."""
    return {"receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"0.0.0.0:{_collector_port(source)}"}}}},
            "processors": {"batch": {}},
            "exporters": {"debug": {"verbosity": "basic"}},  # replace with your backend's exporter (otlp, ...)
            "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                                 "exporters": ["debug"]}}}}


def compose_scrape_config(source: DeploySource) -> dict:
    """One job per compose service, its containers found by DNS (every replica of a scaled one)."""
    names = ["router", *(container.name for container in server_containers(source))]
    return {"global": {"scrape_interval": SCRAPE_INTERVAL},
            "scrape_configs": [{"job_name": name, "dns_sd_configs": [
                {"names": [name], "type": "A", "port": source.settings.metrics_port}]} for name in names]}


def k8s_scrape_config() -> dict:
    """Pods of this namespace annotated prometheus.io/scrape (deploy_k8s.py), at their annotated port."""
    annotation = "__meta_kubernetes_pod_annotation_prometheus_io_"
    return {"global": {"scrape_interval": SCRAPE_INTERVAL},
            "scrape_configs": [{"job_name": APP, "kubernetes_sd_configs": [
                {"role": "pod", "namespaces": {"own_namespace": True}}],
                "relabel_configs": [
                    {"source_labels": [annotation + "scrape"], "action": "keep", "regex": "true"},
                    {"source_labels": ["__meta_kubernetes_pod_ip", annotation + "port"], "separator": ":",
                     "target_label": "__address__", "regex": "(.+)", "replacement": "$1"},
                    {"source_labels": [annotation + "path"], "target_label": "__metrics_path__", "regex": "(.+)"},
                    {"source_labels": ["__meta_kubernetes_pod_label_shardmesh_server"], "target_label": "server"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}]}]}


def compose_config_files(source: DeploySource) -> dict[str, str]:
    """File name (beside the topology file) -> text, of the config files the compose services mount."""
    settings, files = source.settings, {}
    if settings.collector:
        files[COLLECTOR_CONFIG] = to_yaml(collector_config(source))
    if settings.prometheus:
        files[PROMETHEUS_CONFIG] = to_yaml(compose_scrape_config(source))
    return files


def compose_services(source: DeploySource, topology_path: str) -> dict:
    """The compose services [telemetry] asks for; their config files beside `topology_path`."""
    directory = posixpath.dirname(topology_path) or "."

    def beside(name: str) -> str:
        path = posixpath.join(directory, name)
        return path if path.startswith(("/", "./", "../")) else "./" + path

    services = {}
    if source.settings.collector:
        services[COLLECTOR_HOST] = {
            "image": COLLECTOR_IMAGE, "command": [f"--config={COLLECTOR_CONFIG_IN_CONTAINER}"],
            "volumes": [f"{beside(COLLECTOR_CONFIG)}:{COLLECTOR_CONFIG_IN_CONTAINER}:ro"], "restart": "unless-stopped"}
    if source.settings.prometheus:
        services["prometheus"] = {
            "image": PROMETHEUS_IMAGE,
            "command": [f"--config.file={PROMETHEUS_CONFIG_IN_CONTAINER}", "--storage.tsdb.path=/prometheus"],
            "volumes": [f"{beside(PROMETHEUS_CONFIG)}:{PROMETHEUS_CONFIG_IN_CONTAINER}:ro"],
            "ports": [f"127.0.0.1:{PROMETHEUS_PORT}:{PROMETHEUS_PORT}"], "restart": "unless-stopped"}
    return services


def _labels(component: str) -> dict:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}


def _deployment(name: str, container: dict, volumes: list[dict], service_account: str = "") -> dict:
    labels = _labels(name)
    pod = {"containers": [container], "volumes": volumes}
    if service_account:
        pod = {"serviceAccountName": service_account, **pod}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"{APP}-{name}", "labels": labels},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": pod}}}


def _config_map(name: str, key: str, config: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{APP}-{name}", "labels": _labels(name)},
            "data": {key: to_yaml(config)}}


def _service(service_name: str, component: str, port_name: str, port: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": service_name, "labels": _labels(component)},
            "spec": {"selector": _labels(component), "ports": [{"name": port_name, "port": port, "targetPort": port_name}]}}


def _container(name: str, image: str, args: list[str], port_name: str, port: int, mount: str, user: int) -> dict:
    return {"name": name, "image": image, "args": args, "ports": [{"name": port_name, "containerPort": port}],
            "volumeMounts": [{"name": "config", "mountPath": mount, "readOnly": True}],
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": user}}


def k8s_files(source: DeploySource) -> dict[str, list[dict]]:
    """File name -> resources, for the kustomize base (deploy_k8s.py)."""
    files = {}
    if source.settings.collector:
        port = _collector_port(source)
        container = _container(COLLECTOR_HOST, COLLECTOR_IMAGE, [f"--config={COLLECTOR_CONFIG_IN_CONTAINER}"],
                               "otlp-grpc", port, posixpath.dirname(COLLECTOR_CONFIG_IN_CONTAINER), user=10001)
        volumes = [{"name": "config", "configMap": {"name": f"{APP}-{COLLECTOR_HOST}", "items": [
            {"key": "config.yaml", "path": posixpath.basename(COLLECTOR_CONFIG_IN_CONTAINER)}]}}]
        files[f"{COLLECTOR_HOST}.yaml"] = [
            _config_map(COLLECTOR_HOST, "config.yaml", collector_config(source)),
            _deployment(COLLECTOR_HOST, container, volumes),
            _service(COLLECTOR_HOST, COLLECTOR_HOST, "otlp-grpc", port)]  # the otlp_endpoint's host
    if source.settings.prometheus:
        account = f"{APP}-prometheus"
        container = _container("prometheus", PROMETHEUS_IMAGE, [f"--config.file={PROMETHEUS_CONFIG_IN_CONTAINER}",
                               "--storage.tsdb.path=/prometheus"], "web", PROMETHEUS_PORT,
                               posixpath.dirname(PROMETHEUS_CONFIG_IN_CONTAINER), user=65534)
        container["volumeMounts"].append({"name": "data", "mountPath": "/prometheus"})
        volumes = [{"name": "config", "configMap": {"name": account}}, {"name": "data", "emptyDir": {}}]
        files["prometheus.yaml"] = [
            _config_map("prometheus", PROMETHEUS_CONFIG, k8s_scrape_config()),
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "labels": _labels("prometheus")}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": account, "labels": _labels("prometheus")},
             "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": account, "labels": _labels("prometheus")},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
             "subjects": [{"kind": "ServiceAccount", "name": account}]},
            _deployment("prometheus", container, volumes, service_account=account),
            _service(account, "prometheus", "web", PROMETHEUS_PORT)]
    return files
