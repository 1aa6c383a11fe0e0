"""Observability of every service: Prometheus metrics (metrics.py), OpenTelemetry traces
(tracing.py), structured logs (logs.py), and the router's per-request view of both (requests.py).
Servicers call these through one-line hooks; nothing here imports torch."""
