"""What every service process is told at start, validated once (see STYLE.md: config)."""

import dataclasses
import pathlib

import torch

from shardmesh.config import ModelConfig
from shardmesh.topology import Topology

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ServiceConfig:
    model_dir: pathlib.Path
    name: str = ""                  # this server's name in the topology (stage / expert servers)
    topology_file: pathlib.Path | None = None  # None = `topology`, else the model's default
    topology: Topology | None = None  # given directly (in-process meshes); validated below
    router_address: str = ""        # host:port of the router (stage / expert servers)
    host: str = "127.0.0.1"         # bind address: loopback unless said otherwise
    port: int = 0                   # 0 = the OS chooses
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        self.model_dir = pathlib.Path(self.model_dir)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        self.model = ModelConfig.from_dir(self.model_dir)
        if self.topology_file is not None:
            self.topology = Topology.from_file(self.topology_file, self.model)
        elif self.topology is not None:
            self.topology = self.topology.validate(self.model)
        else:
            self.topology = Topology.default(self.model)
        if self.name:
            self.topology.server(self.name)  # raises KeyError naming what the topology has

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
