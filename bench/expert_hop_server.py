"""A real expert server for bench/expert_hop_ab.py: ExpertServicer over every expert of a seeded
checkpoint, served on the gRPC port and the shared-memory plane, with 2 compute threads (as
`shardmesh up` runs it on 2+ cores). Prints one JSON line {"port", "layers", "hidden"}; serves until SIGTERM.

    python bench/expert_hop_server.py --shape small|default
"""

import argparse
import asyncio
import json
import os
import pathlib
import signal
import sys

if "PYTHONPATH" not in os.environ:  # expert_hop_ab.py sets it: the tree under test, not this file's
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import harness  # noqa: E402
from shardmesh import compute_pool, grpc_util  # noqa: E402
from shardmesh.checkpoint import CheckpointReader  # noqa: E402
from shardmesh.config import ModelConfig  # noqa: E402
from shardmesh.expert_model import ExpertShard  # noqa: E402
from shardmesh.shm_server import Method, start_data_plane  # noqa: E402
from shardmesh.v1 import expert_pb2, expert_pb2_grpc  # noqa: E402

from expert_server.servicer import ExpertServicer  # noqa: E402


async def main(shape: str) -> None:
    model_dir = harness.checkpoint(shape)
    config = ModelConfig.from_dir(model_dir)
    shard = ExpertShard(config, [(layer, expert) for layer in range(config.num_layers)
                                 for expert in range(config.num_experts)], CheckpointReader(model_dir))
    servicer = ExpertServicer("experts", shard, torch.float32)
    method = "shardmesh.v1.Expert/ComputeExperts"
    plane, plane_service = await start_data_plane(
        "experts", {method: Method(expert_pb2.ComputeExpertsRequest, servicer.ComputeExperts)}, enabled=True)
    server = await grpc_util.start_server(servicer, expert_pb2_grpc.add_ExpertServicer_to_server, "shardmesh.v1.Expert",
                                          "127.0.0.1", 0, extra_services=[plane_service], on_stop=plane.stop)
    print(json.dumps({"port": server.port, "layers": config.num_layers, "hidden": config.hidden_size}), flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(harness.SHAPES), default="small")
    torch.set_num_threads(1)
    compute_pool.set_threads(2)
    import uvloop
    uvloop.run(main(parser.parse_args().shape))
