"""`shardmesh up` in the foreground: start a whole mesh as local processes (shardmesh.launcher),
print where the router listens and how to reach it, stop everything on Ctrl-C or SIGTERM."""

import pathlib
import signal
import sys
import time

from shardmesh.client_tokens import ClientTokens
from shardmesh.launcher import Launcher, ServiceFailed
from shardmesh.mesh_secrets import TlsFiles

# Ctrl-C / SIGTERM: how long `shardmesh up` lets its router drain (its --shutdown-grace, 20 s by
# default, and a margin to exit) before the servers stop.
ROUTER_DRAIN_S = 25.0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_up(model_dir, topology_file, host: str, dtype: str, threads: int, log_level: str, device: str = "cpu",
           no_auth: bool = False, tls: TlsFiles | None = None, compute_threads: int = 0,
           tokens_file: pathlib.Path | None = None, loop_cpu: int | None = None) -> int:
    """Foreground `shardmesh up`: start, print where the router listens, stop on Ctrl-C/SIGTERM.
    `tokens_file`: named client tokens the router accepts beside the fresh one (checked first).
    `loop_cpu`: every service's --loop-cpu (None: off)."""
    if tokens_file is not None:
        if no_auth:
            print("error: --auth-tokens-file needs authentication on: leave out --no-auth", file=sys.stderr)
            return 2
        try:
            names = ClientTokens.from_file(tokens_file).names
        except (OSError, ValueError) as error:
            print(f"error: --auth-tokens-file: {error}", file=sys.stderr)
            return 2
    if loop_cpu is not None:
        from shardmesh import loop_cpu as loop_cpus
        try:
            loop_cpus.check(loop_cpu, threads)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    service_args = {role: [] if loop_cpu is None else ["--loop-cpu", str(loop_cpu)] for role in ("router", "stage", "expert")}
    if tokens_file is not None:
        service_args["router"] += ["--auth-tokens-file", str(pathlib.Path(tokens_file).resolve())]
    launcher = Launcher(model_dir, topology_file, host=host, dtype=dtype, device=device, threads_per_service=threads,
                        log_level=log_level, progress=lambda message: print(f"  {message}", flush=True),
                        no_auth=no_auth, tls=tls, compute_threads=compute_threads, service_args=service_args)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"starting {len(launcher.topology.stages)} stage(s) and {len(launcher.topology.expert_servers)} "
              f"expert server(s); logs in {launcher.workdir}", flush=True)
        address = launcher.start()
        print(f"router listening on {address}  (Ctrl-C to stop)", flush=True)
        if launcher.metrics_ports:
            print("metrics: " + ", ".join(f"{name} {host}:{port}" for name, port in launcher.metrics_ports.items())
                  + ("" if all(launcher.metrics_ports.values()) else " (0: see the service's log)"), flush=True)
        token_file = launcher.secrets.client_token_file
        tls_args = (f" --tls-ca {tls.ca}" + ("" if tls.clients_without_certificates
                                            else " --tls-cert CLIENT.pem --tls-key CLIENT-key.pem")) if tls else ""
        print(f"client token in {token_file}: shardmesh generate --router {address} --token-file {token_file}"
              f"{tls_args} --prompt ..." if token_file else "authentication off (--no-auth): for local use only",
              flush=True)
        if tokens_file is not None:
            print(f"named client tokens from {tokens_file}: {', '.join(names)}", flush=True)
        while True:
            launcher.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping the mesh", flush=True)
        return 0
    except ServiceFailed as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        launcher.stop(router_grace=ROUTER_DRAIN_S)
