"""`shardmesh up`: every service of a topology as its own process on loopback.

The router starts first on a port the OS chooses (it writes it to a file); stage and expert
servers then start with `--router` and register themselves. `Launcher` waits for the router's
grpc.health.v1 SERVING, watches its children, and stops them all (SIGTERM, then SIGKILL after a
grace period) when it is closed. The topology file's [telemetry] and [auto_rebalance] tables
(shardmesh.mesh_settings) become every service's flags, as in the generated compose file."""

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from shardmesh.config import ModelConfig
from shardmesh.mesh_secrets import MeshSecrets, TlsFiles
from shardmesh.mesh_settings import MeshSettings
from shardmesh.topology import Topology


PARENT_PID_ENV = "SHARDMESH_LAUNCHER_PID"  # set in each service's environment by the launcher


def die_with_launcher() -> None:
    """In a service started by `Launcher`, first thing: SIGTERM it when the launcher dies, even by
    SIGKILL (Linux PR_SET_PDEATHSIG), so a killed `shardmesh up` leaves no orphaned services.

    Done by the service itself, not in a `preexec_fn`: a preexec_fn makes Popen fork() a process
    with live gRPC threads and run Python between fork and exec, where grpcio's fork handlers can
    abort the child (epoll_wait EBADF, grpc/grpc#43055); without it Popen spawns with vfork."""
    launcher_pid = os.environ.pop(PARENT_PID_ENV, None)
    if launcher_pid is None or sys.platform != "linux":
        return
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(launcher_pid):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class ServiceFailed(RuntimeError):
    pass


class Launcher:
    def __init__(self, model_dir: str | pathlib.Path, topology_file: str | pathlib.Path | None = None, *,
                 host: str = "127.0.0.1", dtype: str = "", device: str = "cpu",
                 threads_per_service: int | dict[str, int] = 1, log_level: str = "WARNING",
                 ready_timeout: float = 180.0, progress: Callable[[str], None] | None = None,
                 service_args: dict[str, list[str]] | None = None, no_auth: bool = False,
                 tls: TlsFiles | None = None, compute_threads: int = 0):
        """threads_per_service: torch threads of every service, or a dict role ("router" | "stage" |
        "expert") -> threads (roles not named get 1). compute_threads: each stage's and expert
        server's --compute-threads (0 = 2 where the host has 2 cores or more: services of one
        host take turns, and these threads sleep when idle; see shardmesh.compute_pool).
        service_args: role -> extra command-line arguments of that role's services (e.g.
        {"router": ["--micro-batches", "2"]}; they come last, so they override).
        Fresh random tokens protect the mesh (`client_token`, `secrets.client_token_file`) unless
        `no_auth`; `tls` makes every service speak mutual TLS (see shardmesh.mesh_secrets)."""
        self.model_dir = pathlib.Path(model_dir).absolute()
        self.config = ModelConfig.from_dir(self.model_dir)
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="shardmesh-up-"))
        if topology_file is None:
            topology = Topology.default(self.config)
            topology_file = self.workdir / "topology.toml"
            topology_file.write_text(topology.to_toml())
        self.topology_file = pathlib.Path(topology_file).absolute()
        self.topology = Topology.from_file(self.topology_file, self.config)
        # [telemetry] / [auto_rebalance] of the topology file: the same flags as the compose file's.
        self.settings = MeshSettings.from_toml(self.topology_file.read_text())
        self.metrics_ports: dict[str, int] = {}  # service -> its --metrics-port (0 = its own choice; see command)
        self.host, self.dtype, self.threads, self.log_level = host, dtype, threads_per_service, log_level
        self.device = device  # every service's ("" = each server's in the topology, else cpu); "" dtype = its default
        self.service_args = {role: list(args) for role, args in (service_args or {}).items()}
        self.compute_threads = compute_threads or min(2, os.cpu_count() or 1)
        self.ready_timeout = ready_timeout
        self.progress = progress or (lambda message: None)
        self.processes: dict[str, subprocess.Popen] = {}
        self.router_address = ""
        self.secrets = MeshSecrets.create(self.workdir, no_auth, tls)

    @property
    def client_token(self) -> str | None:
        """What a client sends as `Client(address, token=...)`; None under no_auth."""
        return self.secrets.client_token

    def _spawn(self, name: str, role: str, *extra: str) -> None:
        command = self.command(name, role, *extra)
        log_file = open(self.workdir / f"{name.replace('/', '-')}.log", "wb")  # "stage-0/tp1" -> stage-0-tp1.log
        # A session of its own: Ctrl-C in a terminal signals the launcher only, which stops the
        # router first (`stop`); setsid runs in C, no Python in the child (see die_with_launcher).
        self.processes[name] = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True,
                                                env=os.environ | {PARENT_PID_ENV: str(os.getpid())})

    def command(self, name: str, role: str, *extra: str) -> list[str]:
        """The command line of service `name` (`extra` last: it overrides)."""
        metrics_port = None
        if self.settings.metrics_port is not None:  # one host: the router gets the file's port, the next ones +1, +2, ...
            metrics_port = self.metrics_ports.setdefault(
                name, self.settings.metrics_port and self.settings.metrics_port + len(self.metrics_ports))
        return [sys.executable, "-m", "shardmesh.cli", role, "--model", str(self.model_dir),
                "--topology", str(self.topology_file), "--host", self.host,
                *(["--device", self.device] if self.device else []),  # "": the topology's per server
                *(["--dtype", self.dtype] if self.dtype else []),
                "--threads", str(self._threads(role)), "--log-level", self.log_level,
                *(["--compute-threads", str(self.compute_threads)] if role != "router" else []),
                *self.settings.service_args(role, metrics_port),
                *self.service_args.get(role, ()), *self.secrets.service_args(role), *extra]

    def add_expert_replica(self, name: str, replica_id: str, port: int = 0) -> subprocess.Popen:
        """Start one more replica of expert server `name` (as `docker compose up --scale` would; port
        0 = the OS chooses) once the router runs: it registers and joins the placement. Its process is
        `processes[f"{name}@{replica_id}"]` (a restart with the same id replaces it there)."""
        key = f"{name}@{replica_id}"
        self._spawn(key, "expert", "--name", name, "--replica-id", replica_id, "--router", self.router_address,
                    *(["--port", str(port)] if port else []))
        return self.processes[key]

    def _threads(self, role: str) -> int:
        return self.threads.get(role, 1) if isinstance(self.threads, dict) else self.threads

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name.replace('/', '-')}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise ServiceFailed(f"{name} exited with code {process.returncode}:\n{self.log_tail(name)}")

    def start(self) -> str:
        """Start everything; return the router's host:port once it is SERVING."""
        port_file = self.workdir / "router.port"
        self._spawn("router", "router", "--port-file", str(port_file))
        deadline = time.monotonic() + self.ready_timeout
        while not port_file.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise ServiceFailed(f"router did not start within {self.ready_timeout:.0f} s")
            time.sleep(0.05)
        self.router_address = f"{self.host}:{int(port_file.read_text())}"
        for spec in self.topology.stages:
            if spec.tp == 1:
                self._spawn(spec.name, "stage", "--name", spec.name, "--router", self.router_address)
            # A tensor-parallel stage's shards get their ranks and rendezvous from the router
            # (router/tp_ranks.py), so a shard restarted under its id makes the group re-form:
            # process "stage-1/shard-1" may hold any rank. Each keeps its topology shard's device.
            for i, shard in enumerate(spec.shard_names() if spec.tp > 1 else ()):
                device = [] if self.device or not self.topology.device_of(shard) else [
                    "--device", self.topology.device_of(shard)]
                self._spawn(f"{spec.name}/shard-{i}", "stage", "--name", spec.name, "--tp-rank", "auto",
                            "--tp-shard-id", f"{spec.name}/shard-{i}", "--router", self.router_address, *device)
            for replica_id in spec.replica_ids()[1:]:  # standbys: "stage-1@standby-1" in self.processes
                self._spawn(f"{spec.name}@{replica_id}", "stage", "--name", spec.name, "--replica-id", replica_id,
                            "--router", self.router_address)
        for spec in self.topology.expert_servers:
            self._spawn(spec.name, "expert", "--name", spec.name, "--router", self.router_address)
        asyncio.run(self._wait_serving(deadline))
        return self.router_address

    async def _wait_serving(self, deadline: float) -> None:
        import grpc

        from shardmesh.grpc_util import open_channel, wait_for_health
        from shardmesh.v1 import router_pb2, router_pb2_grpc

        announced: set[str] = set()
        security = self.secrets.client_security()
        async with open_channel(self.router_address, security) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            while True:
                self.check_alive()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServiceFailed(f"the mesh was not SERVING within {self.ready_timeout:.0f} s")
                try:
                    status = await router.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=2.0,
                                                           metadata=self.secrets.client_metadata())
                except grpc.aio.AioRpcError:
                    status = None
                for server in status.servers if status else ():
                    if server.registered and server.name not in announced:
                        announced.add(server.name)
                        self.progress(f"{server.name} registered at {server.address} "
                                      f"({len(announced)}/{len(status.servers)})")
                if status is not None and status.serving and self._standbys_registered(status):
                    await wait_for_health(self.router_address, remaining, security=security)  # grpc.health.v1 agrees
                    return
                await asyncio.sleep(0.1)

    def _standbys_registered(self, status) -> bool:
        """Whether every stage lists its active server and all its standbys (they register after it)."""
        wanted = {spec.name: 1 + spec.standbys for spec in self.topology.stages}
        return all(len(server.replica_addresses) >= wanted[server.name]
                   for server in status.servers if server.name in wanted)

    def stop(self, grace: float = 10.0, router_grace: float | None = None) -> None:
        """The router first: SIGTERM, and up to `router_grace` s (default `grace`) while it drains
        (NOT_SERVING, new requests refused, streams in flight finish through the servers, still
        running; its --shutdown-grace); then SIGTERM every server. SIGKILL what is left after each wait."""
        self._terminate(["router"] if "router" in self.processes else [], grace if router_grace is None else router_grace)
        self._terminate([name for name in self.processes if name != "router"], grace)

    def _terminate(self, order: list[str], grace: float) -> None:
        for name in order:
            if self.processes[name].poll() is None:
                self.processes[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name in order:
            try:
                self.processes[name].wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.processes[name].kill()
                self.processes[name].wait()

    def __enter__(self) -> "Launcher":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
