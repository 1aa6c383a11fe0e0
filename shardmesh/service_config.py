"""What every service process is told at start, validated once (see STYLE.md: config)."""

import dataclasses
import os
import pathlib
import socket

import torch

from shardmesh import advertise
from shardmesh.config import ModelConfig
from shardmesh.security import Security
from shardmesh.topology import ExpertServerSpec, Topology

DATA_PLANES = ("shm", "grpc", "nccl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: str) -> str:
    """bfloat16 on CUDA, float32 on CPU: what `--dtype` means when it is not given."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def check_device(device: str) -> str:
    """`device` normalized ("cpu" or "cuda:N"); ValueError naming it when this machine lacks it."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not 'cpu' or 'cuda:N' ({error})") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise ValueError(f"device {device!r} is not 'cpu' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    index = 0 if parsed.index is None else parsed.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"


@dataclasses.dataclass
class ServiceConfig:
    model_dir: pathlib.Path
    name: str = ""                  # this server's name in the topology (stage / expert servers)
    topology_file: pathlib.Path | None = None  # None = `topology`, else the model's default
    topology: Topology | None = None  # given directly (in-process meshes); validated below
    router_address: str = ""        # host:port of the router (stage / expert servers)
    host: str = "127.0.0.1"         # bind address: loopback unless said otherwise
    port: int = 0                   # 0 = the OS chooses
    dtype: str = ""                 # "" = default_dtype(device): bfloat16 on CUDA, float32 on CPU
    device: str = "cpu"             # "cpu" or "cuda:N": weights, KV caches and compute live there;
    # "" = the topology's `device` for this server (Topology.device_of), else "cpu"
    advertise_address: str = ""     # HOST[:PORT] registered with the router; "" = host:bound port (see advertise.py)
    replica_id: str = ""            # tells replicas of one expert server / a stage's standbys apart ("" = the first)
    # "shm": tensors to and from services of this host through shared memory (negotiated per
    # peer, gRPC bytes with the others); "grpc": always in gRPC messages (shardmesh.shm_plane).
    data_plane: str = "shm"
    # A shard of a tensor-parallel stage (tp > 1): host:port of its group's rendezvous, which rank 0
    # (the stage's own name) binds; every shard of the stage is given the same. Without one (as
    # `shardmesh up` and the local mesh start shards), the shard asks the router (router/tp_ranks.py)
    # where its group meets, and the group re-forms when a shard restarts (stage_server/tp_membership.py).
    tp_rendezvous: str = ""
    # A shard started as its stage's name with no rank (`--tp-rank auto`): the router assigns the
    # rank (which slice it loads) and the rendezvous. tp_shard_id names this shard to the router
    # ("" = host name and process id; {hostname} expands as in advertise).
    tp_auto_rank: bool = False
    tp_shard_id: str = ""
    tp_join_timeout: float = 120.0  # s for every shard of the group to join (then NOT_SERVING with the reason)
    tp_collective_timeout: float = 60.0  # s one AllReduce waits for a peer (then the group breaks: NOT_SERVING)
    host_id: str = ""  # advertised to TP peers (StageInfo.host_id); "" = this host's (shm_allreduce.host_id)
    # Stage and expert servers register again this often (s), so a restarted router gets them back
    # (shardmesh.registration; the default is its REREGISTER_INTERVAL_S).
    reregister_interval_s: float = 5.0
    # Expert servers: where to keep what it holds across restarts (expert_server/assignment_file.py); None = nowhere.
    assignment_file: pathlib.Path | None = None
    # A stage: sequences its KV cache may hold (0 = no limit); a step starting one more gets
    # RESOURCE_EXHAUSTED naming the sequence (StageModel.max_cached_sequences).
    max_cached_sequences: int = 0
    # TLS and tokens (shardmesh.security); the default, for in-process meshes, checks nothing.
    # The command line requires tokens unless --no-auth (security.service_security).
    security: Security = dataclasses.field(default_factory=Security)

    def __post_init__(self):
        self.model_dir = pathlib.Path(self.model_dir)
        self.device = check_device(self.device) if self.device else ""  # "": the topology's, below
        if self.dtype and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if not self.reregister_interval_s > 0:
            raise ValueError(f"reregister_interval_s {self.reregister_interval_s} must be > 0")
        if not (self.tp_join_timeout > 0 and self.tp_collective_timeout > 0):
            raise ValueError(f"tp timeouts must be > 0 s (join {self.tp_join_timeout}, "
                             f"collective {self.tp_collective_timeout})")
        if self.data_plane not in DATA_PLANES:
            raise ValueError(f"data_plane {self.data_plane!r} is not one of {list(DATA_PLANES)}")
        self.model = ModelConfig.from_dir(self.model_dir)
        if self.topology_file is not None:
            self.topology = Topology.from_file(self.topology_file, self.model)
        elif self.topology is not None:
            self.topology = self.topology.validate(self.model)
        else:
            self.topology = Topology.default(self.model)
        if self.name:
            self.topology.server(self.name)  # raises KeyError naming what the topology has
        if not self.device:  # the topology file's `device` for this server, else the CPU
            self.device = check_device(self.topology.device_of(self.name) or "cpu")
        self.dtype = self.dtype or default_dtype(self.device)
        self.advertise_address = advertise.check(self.advertise_address)
        tp = getattr(self.topology.server(self.name), "tp", 1) if self.name else 1
        if tp > 1 and not self.tp_rendezvous and not self.router_address:
            raise ValueError(f"{self.name!r} is a shard of a tensor-parallel stage: it needs a tp_rendezvous (host:port) "
                             f"or a router to ask for it")
        if self.tp_auto_rank and (tp == 1 or self.tp_rendezvous or self.name != self.topology.server(self.name).name):
            raise ValueError(f"tp_auto_rank: {self.name!r} must be the name of a tensor-parallel stage (not a shard's "
                             f"\"/tpN\"), without a tp_rendezvous: the router gives both")
        self.tp_shard_id = advertise.expand(self.tp_shard_id) or f"{socket.gethostname()}-{os.getpid()}"
        self.replica_id = advertise.expand(self.replica_id)
        spec = self.topology.server(self.name) if self.name else None
        if self.replica_id and not (isinstance(spec, ExpertServerSpec) or getattr(spec, "standbys", 0)):
            raise ValueError(f"replica id {self.replica_id!r}: only expert servers and stages with standbys have "
                             f"replicas, {self.name!r} is neither")

    def advertised(self, bound_port: int) -> str:
        """host:port to register with the router, once bound to `bound_port`."""
        return advertise.advertised_address(self.advertise_address, self.host, bound_port)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
