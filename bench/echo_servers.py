"""Transport-only servers for bench/step_breakdown.py and bench/dataplane_roundtrip.py: the Expert
and Stage services answering with tensors of the right size and no compute, so a round trip to them
is the cost of the hop alone; each also offers the shared-memory data plane (DataPlane service) and
joins NCCL links (gloo point to point on the CPU: nccl_dispatch.py).

    python bench/echo_servers.py --vocab-size 32000
    -> prints one JSON line {"expert": port, "stage_hidden": port, "stage_logits": port}, serves until SIGTERM
"""

import argparse
import asyncio
import json
import signal
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from shardmesh import codec, grpc_util  # noqa: E402
from shardmesh.nccl_dispatch import serves_nccl_calls  # noqa: E402
from shardmesh.shm_server import Method, start_data_plane  # noqa: E402
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, stage_pb2, stage_pb2_grpc  # noqa: E402


class EchoExpertServicer(expert_pb2_grpc.ExpertServicer):
    """Every group's hidden_states back as its output (decoded and encoded as the real servicer
    does: over shared memory a view in, a copy into the segment out)."""

    REQUEST = expert_pb2.ComputeExpertsRequest
    nccl = None  # the NcclEndpoint of links stages formed (set by serve)

    @serves_nccl_calls
    async def ComputeExperts(self, request, context):
        if request.HasField("packed"):  # what stages send: every group in one tensor
            return expert_pb2.ComputeExpertsResponse(packed_outputs=codec.encode(
                codec.decode(request.packed.hidden_states, "packed.hidden_states")))
        return expert_pb2.ComputeExpertsResponse(outputs=[
            codec.encode(codec.decode(group.hidden_states, f"groups[{i}]")) for i, group in enumerate(request.groups)])


class EchoStageServicer(stage_pb2_grpc.StageServicer):
    """Hidden states [N, H] back (a middle stage), or zero logits [num_sequences, V] (the last stage)."""

    REQUEST = stage_pb2.StepRequest

    def __init__(self, vocab_size: int | None):
        self.vocab_size = vocab_size

    async def Step(self, request_iterator, context):
        async for request in request_iterator:
            hidden_states = codec.decode(request.hidden_states, "hidden_states")
            if self.vocab_size is None:
                yield stage_pb2.StepResponse(step_id=request.step_id, hidden_states=codec.encode(hidden_states))
            else:
                logits = torch.zeros(len(request.sequences), self.vocab_size)
                yield stage_pb2.StepResponse(step_id=request.step_id, logits=codec.encode(logits))


async def serve(name: str, servicer, add_to_server, service: str, method: str, streaming: bool):
    plane, plane_service = await start_data_plane(name, {
        f"{service}/{method}": Method(type(servicer).REQUEST, getattr(servicer, method), streaming)}, enabled=True,
        nccl=True)
    servicer.nccl = plane_service[0].nccl
    return await grpc_util.start_server(servicer, add_to_server, service, "127.0.0.1", 0,
                                        extra_services=[plane_service], on_stop=plane.stop)


async def main(args) -> None:
    servers = {
        "expert": await serve("expert", EchoExpertServicer(), expert_pb2_grpc.add_ExpertServicer_to_server,
                              "shardmesh.v1.Expert", "ComputeExperts", False),
        "stage_hidden": await serve("stage_hidden", EchoStageServicer(None), stage_pb2_grpc.add_StageServicer_to_server,
                                    "shardmesh.v1.Stage", "Step", True),
        "stage_logits": await serve("stage_logits", EchoStageServicer(args.vocab_size),
                                    stage_pb2_grpc.add_StageServicer_to_server, "shardmesh.v1.Stage", "Step", True),
    }
    print(json.dumps({name: server.port for name, server in servers.items()}), flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers.values():
        await server.stop(None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab-size", type=int, required=True)
    torch.set_num_threads(1)  # as `shardmesh up` runs every service
    import uvloop
    uvloop.run(main(parser.parse_args()))
