"""Settings of a whole mesh that the topology file carries beside who holds what, so that the
three ways of running one topology file (`shardmesh up`, the generated compose file, the generated
Kubernetes manifests) start every service observable and rebalancing alike. Needs no torch.

    [telemetry]
    metrics_port = 9464                      # every service: Prometheus /metrics on this port (default off)
    otlp_endpoint = "otel-collector:4317"    # every service: traces over OTLP/gRPC to this collector (default off)
    trace_sample_ratio = 0.1                 # share of requests traced, parent-based (default 1.0)
    collector = true                         # compose/k8s: add an OpenTelemetry collector service
                                             # `otel-collector` (needs otlp_endpoint = "otel-collector:PORT")
    prometheus = true                        # compose/k8s: add a Prometheus scraping every service's
                                             # metrics_port (needs a metrics_port other than 0)

    [auto_rebalance]                         # the router re-places experts (router/auto_rebalance.py)
    threshold = 1.5                          # when busiest expert server / mean stays above this (> 1)
    interval_seconds = 30                    # between checks (default 30)

Services read the topology file too and ignore these tables: what a service does is what its
command line says (`service_args` writes those flags, and the generated files show them).
`shardmesh up` runs every service on one host, so it gives the router `metrics_port` and each
further service the next port, in start order (0: each lets the OS choose)."""

import dataclasses
import tomllib

TABLES = ("telemetry", "auto_rebalance")  # the topology file's tables that are no server (topology.py)
COLLECTOR_HOST = "otel-collector"  # the collector service's name (shardmesh/deploy_telemetry.py)
_KEYS = {"telemetry": {"metrics_port", "otlp_endpoint", "trace_sample_ratio", "collector", "prometheus"},
         "auto_rebalance": {"threshold", "interval_seconds"}}


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    metrics_port: int | None = None       # None = no metrics endpoint
    otlp_endpoint: str = ""               # "" = tracing off
    trace_sample_ratio: float = 1.0       # of requests (root spans); remote children follow their parent
    auto_rebalance_threshold: float = 0.0  # 0 = off
    auto_rebalance_interval_s: float = 30.0
    collector: bool = False               # generated deploy files add an OTLP collector service
    prometheus: bool = False              # generated deploy files add a Prometheus service

    def __post_init__(self):
        if self.metrics_port is not None and not (isinstance(self.metrics_port, int) and 0 <= self.metrics_port < 65536):
            raise ValueError(f"[telemetry] metrics_port {self.metrics_port!r} is not an integer in [0, 65535]")
        host, _, port = self.otlp_endpoint.rpartition(":")
        if self.otlp_endpoint and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"[telemetry] otlp_endpoint {self.otlp_endpoint!r} is not host:port")
        if self.collector is not False and (self.collector is not True or host != COLLECTOR_HOST):
            raise ValueError(f"[telemetry] collector = {self.collector!r}: true adds the service {COLLECTOR_HOST!r}, "
                             f"so it needs otlp_endpoint = \"{COLLECTOR_HOST}:4317\" (any port)")
        if self.prometheus is not False and (self.prometheus is not True or not self.metrics_port):
            raise ValueError(f"[telemetry] prometheus = {self.prometheus!r}: true scrapes every service's "
                             f"metrics_port, so it needs a metrics_port other than 0")
        if not 0 < self.trace_sample_ratio <= 1:
            raise ValueError(f"[telemetry] trace_sample_ratio {self.trace_sample_ratio} is not in (0, 1]")
        if self.auto_rebalance_threshold and not self.auto_rebalance_threshold > 1:
            raise ValueError(f"[auto_rebalance] threshold {self.auto_rebalance_threshold} must be > 1 "
                             f"(1 = perfectly even)")
        if not self.auto_rebalance_interval_s > 0:
            raise ValueError(f"[auto_rebalance] interval_seconds {self.auto_rebalance_interval_s} must be > 0")

    @classmethod
    def from_toml(cls, text: str) -> "MeshSettings":
        """The settings of a topology file's text (all off when it has neither table)."""
        raw = tomllib.loads(text)
        for table in TABLES:
            if not isinstance(raw.get(table, {}), dict):
                raise ValueError(f"topology: [{table}] must be one table, not [[{table}]]")
            unknown = set(raw.get(table, {})) - _KEYS[table]
            if unknown:
                raise ValueError(f"topology: [{table}] has unknown keys {sorted(unknown)} (known: {sorted(_KEYS[table])})")
        telemetry, auto = raw.get("telemetry", {}), raw.get("auto_rebalance", {})
        if auto and "threshold" not in auto:
            raise ValueError("topology: [auto_rebalance] needs a threshold (> 1)")
        return cls(metrics_port=telemetry.get("metrics_port"), otlp_endpoint=str(telemetry.get("otlp_endpoint", "")),
                   trace_sample_ratio=float(telemetry.get("trace_sample_ratio", 1.0)),
                   auto_rebalance_threshold=float(auto.get("threshold", 0.0)),
                   auto_rebalance_interval_s=float(auto.get("interval_seconds", 30.0)),
                   collector=telemetry.get("collector", False), prometheus=telemetry.get("prometheus", False))

    def service_args(self, role: str, metrics_port: int | None = None) -> list[str]:
        """The flags these settings give a service of `role` ("router", "stage", "expert");
        `metrics_port` replaces the file's (the launcher's per-service ports on one host)."""
        port = self.metrics_port if metrics_port is None else metrics_port
        args = ["--metrics-port", str(port)] if self.metrics_port is not None else []
        if self.otlp_endpoint:
            args += ["--otlp-endpoint", self.otlp_endpoint]
            if self.trace_sample_ratio != 1.0:
                args += ["--trace-sample-ratio", repr(self.trace_sample_ratio)]
        if role == "router" and self.auto_rebalance_threshold:
            args += ["--auto-rebalance", repr(self.auto_rebalance_threshold),
                     "--auto-rebalance-interval", repr(self.auto_rebalance_interval_s)]
        return args
