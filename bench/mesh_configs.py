"""The mesh configurations the benchmarks compare: topology shape, threads per role, extra arguments.

Keys read <stages>s<expert servers>e-<data plane>[-mb<micro-batches>][-t<threads per stage/expert>]."""

import dataclasses
import pathlib

import harness


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    stages: int
    expert_servers: int
    micro_batches: int = 1
    threads: int = 1          # torch threads of each stage and expert server (the router gets 1)
    compute_threads: int = 1  # their compute threads (shardmesh.compute_pool)
    data_plane: str = "grpc"  # "grpc" (bytes in messages) | "shm" (shared memory between processes)
    split: str = "layers"     # experts spread over expert servers by layer range ("layers") or by expert id
    omp_passive: bool = False  # OMP_WAIT_POLICY=PASSIVE in the services: torch's threads sleep between kernels
    stage_threads: int = 0     # the stages' torch threads and compute threads when they differ from
    stage_compute_threads: int = 0  # the expert servers' (0 = threads / compute_threads)
    cpu_kernels: bool = True   # False: SHARDMESH_CPU_KERNELS=0, torch instead of shardmesh.kernels' C kernels
    decode_attention: bool = True  # False: SHARDMESH_DECODE_ATTENTION=0, SDPA per sequence (models/decode_attention.py)
    huge_pages: bool = True    # False: SHARDMESH_HUGE_PAGES=0, the stages' weights in small pages (shardmesh/huge_pages.py)
    loop_cpu: int | None = None  # every service's --loop-cpu (shardmesh/loop_cpu.py); None: off

    @property
    def env(self) -> dict:
        """Environment variables of the mesh's processes (on top of this process's)."""
        env = {"OMP_WAIT_POLICY": "PASSIVE"} if self.omp_passive else {}
        env = env if self.decode_attention else {**env, "SHARDMESH_DECODE_ATTENTION": "0"}
        env = env if self.huge_pages else {**env, "SHARDMESH_HUGE_PAGES": "0"}
        return env if self.cpu_kernels else {**env, "SHARDMESH_CPU_KERNELS": "0"}

    @property
    def service_args(self) -> dict:
        plane = ["--data-plane", self.data_plane]
        compute = plane + ["--compute-threads", str(self.compute_threads)]
        stage = plane + ["--compute-threads", str(self.stage_compute_threads or self.compute_threads)]
        loop = [] if self.loop_cpu is None else ["--loop-cpu", str(self.loop_cpu)]
        return {"router": ["--micro-batches", str(self.micro_batches), *plane, *loop], "stage": stage + loop,
                "expert": compute + loop}

    @property
    def thread_counts(self) -> dict:
        return {"router": 1, "stage": self.stage_threads or self.threads, "expert": self.threads}

    def write(self, path: pathlib.Path, config) -> pathlib.Path:
        """A topology file for `config` (a ModelConfig): layers split evenly over the stages."""
        layers, experts = config.num_layers, config.num_experts
        bounds = [round(i * layers / self.stages) for i in range(self.stages + 1)]
        stages = list(zip(bounds, bounds[1:]))
        if self.split == "layers":
            cuts = [round(i * layers / self.expert_servers) for i in range(self.expert_servers + 1)]
            servers = [(list(range(experts)), (a, b)) for a, b in zip(cuts, cuts[1:])]
        else:
            cuts = [round(i * experts / self.expert_servers) for i in range(self.expert_servers + 1)]
            servers = [(list(range(a, b)), (0, layers)) for a, b in zip(cuts, cuts[1:])]
        return harness.write_topology(path, layers, stages, servers)


CONFIGS = {
    "1s1e-grpc": MeshConfig(1, 1),
    "1s1e-grpc-t2": MeshConfig(1, 1, threads=2),
    "1s1e-shm": MeshConfig(1, 1, data_plane="shm"),
    "1s1e-shm-mb2": MeshConfig(1, 1, micro_batches=2, data_plane="shm"),
    "1s1e-shm-t2": MeshConfig(1, 1, threads=2, data_plane="shm"),
    "2s2e-shm-t2": MeshConfig(2, 2, threads=2, data_plane="shm"),
    "2s2e-shm-mb2-t2": MeshConfig(2, 2, micro_batches=2, threads=2, data_plane="shm"),
    "1s1e-grpc-c2": MeshConfig(1, 1, compute_threads=2),
    "1s1e-shm-c2": MeshConfig(1, 1, compute_threads=2, data_plane="shm"),
    # The same on torch alone (no C kernels): the A/B baseline of shardmesh/kernels.
    "1s1e-shm-c2-torch": MeshConfig(1, 1, compute_threads=2, data_plane="shm", cpu_kernels=False),
    # The same with SDPA per sequence instead of the decode attention kernel: its A/B baseline.
    "1s1e-shm-c2-sdpa": MeshConfig(1, 1, compute_threads=2, data_plane="shm", decode_attention=False),
    # ... and with the stage's weights in small pages too: the stage as before issue 5's session 5.
    "1s1e-shm-c2-sdpa-small-pages": MeshConfig(1, 1, compute_threads=2, data_plane="shm", decode_attention=False,
                                               huge_pages=False),
    # One stage with two micro-batches in flight: one step's attention while the other's experts compute.
    "1s1e-shm-mb2-c2": MeshConfig(1, 1, micro_batches=2, compute_threads=2, data_plane="shm"),
    "1s1e-grpc-mb2-c2": MeshConfig(1, 1, micro_batches=2, compute_threads=2),
    "2s2e-grpc-c2": MeshConfig(2, 2, compute_threads=2),
    "2s2e-shm-c2": MeshConfig(2, 2, compute_threads=2, data_plane="shm"),
    # The same with every service's event loop on CPU 0 and their helpers on the others (--loop-cpu 0).
    "1s1e-shm-c2-loop0": MeshConfig(1, 1, compute_threads=2, data_plane="shm", loop_cpu=0),
    "2s2e-shm-c2-loop0": MeshConfig(2, 2, compute_threads=2, data_plane="shm", loop_cpu=0),
    "2s2e-shm-mb2-c2": MeshConfig(2, 2, micro_batches=2, compute_threads=2, data_plane="shm"),
    "2s2e-grpc": MeshConfig(2, 2),
    # torch's own threads (2) that sleep between kernels (-p: OMP_WAIT_POLICY=PASSIVE) instead of compute
    # threads: in every service (t2p), in the stage only (st2p), with compute threads too (c2-t2p). On the
    # bench machine none beat 1s1e-shm-c2 (bench/results/decode_throughput-default-20261126-080036.txt).
    "1s1e-shm-st2p": MeshConfig(1, 1, compute_threads=2, stage_threads=2, stage_compute_threads=1,
                                data_plane="shm", omp_passive=True),
    "1s1e-shm-t2p": MeshConfig(1, 1, threads=2, data_plane="shm", omp_passive=True),
    "1s1e-shm-c2-t2p": MeshConfig(1, 1, threads=2, compute_threads=2, data_plane="shm", omp_passive=True),
    "2s2e-grpc-mb2": MeshConfig(2, 2, micro_batches=2),
    "2s2e-grpc-mb2-t2": MeshConfig(2, 2, micro_batches=2, threads=2),
    "2s2e-shm": MeshConfig(2, 2, data_plane="shm"),
    "2s2e-shm-mb2": MeshConfig(2, 2, micro_batches=2, data_plane="shm"),
}
# What the issue asks to compare, with 2 compute threads per service (shardmesh up's default on 2+ cores):
# one stage + one expert server; two + two over gRPC bytes; the same over shared memory; and that
# with 2 micro-batches in flight (the router's default with 2 stages, i.e. all of shardmesh up's defaults).
# And one stage + one expert server with every event loop on CPU 0 (shardmesh up --loop-cpu 0).
DEFAULT = ["1s1e-shm-c2", "1s1e-shm-c2-loop0", "2s2e-grpc-c2", "2s2e-shm-c2", "2s2e-shm-mb2-c2"]
