"""A data-plane server whose one method doubles tensors, for the CUDA IPC plane tests: imported by
tests/test_cuda_ipc_plane.py (in process, fake IPC backend) and run as a process by
tests/test_gpu_ipc.py (`python tests/ipc_echo_server.py cuda:0`: prints `PORT <n>`, serves until
its stdin closes). On CUDA it also answers JoinNcclGroup (tests/test_gpu_nccl.py)."""

import asyncio
import contextlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from shardmesh import codec, grpc_util  # noqa: E402
from shardmesh.nccl_plane import NcclEndpoint  # noqa: E402
from shardmesh.shm_server import SERVICE_NAME, DataPlaneServicer, Method, ShmPlaneServer  # noqa: E402
from shardmesh.v1 import dataplane_pb2_grpc, expert_pb2  # noqa: E402

DOUBLE = "test.Echo/Double"
MARK = -7.0


class Doubler:
    """Every group's hidden_states times two, then MARK written in place at [0, 0] of the input: the
    client sees the mark only if the input was a view of memory both processes map. Records the
    span field each input came in (`inputs`: "cuda_ipc", "shm" or "data") and its device."""

    def __init__(self):
        self.inputs: list[tuple[str, str]] = []

    async def Double(self, request, context):
        outputs = []
        for i, group in enumerate(request.groups):
            message = group.hidden_states
            where = next((f for f in ("cuda_ipc", "shm") if message.HasField(f)), "data")
            hidden_states = codec.decode(message, f"groups[{i}].hidden_states")  # [n, H]
            self.inputs.append((where, str(hidden_states.device)))
            outputs.append(codec.encode(hidden_states * 2))
            if where != "data":
                hidden_states.view(-1)[0] = MARK
        return expert_pb2.ComputeExpertsResponse(outputs=outputs)


@contextlib.asynccontextmanager
async def echo_server(device: str = "cpu", ipc_backend=None):
    """(plane, doubler, address) of a running data-plane server on loopback."""
    doubler = Doubler()
    plane = ShmPlaneServer("echo", {DOUBLE: Method(expert_pb2.ComputeExpertsRequest, doubler.Double)},
                           device=device, ipc_backend=ipc_backend)
    await plane.start()
    nccl = NcclEndpoint(device, join_timeout_s=30) if device.startswith("cuda") else None  # JoinNcclGroup too
    running = await grpc_util.start_server(DataPlaneServicer(plane, nccl),
                                           dataplane_pb2_grpc.add_DataPlaneServicer_to_server, SERVICE_NAME,
                                           "127.0.0.1", 0)
    try:
        yield plane, doubler, running.address
    finally:
        await running.stop(None)
        await plane.stop()


async def serve_until_stdin_closes(device: str) -> None:
    async with echo_server(device) as (_, doubler, address):
        print(f"PORT {address.rsplit(':', 1)[1]}", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # the test closes our stdin (or kills us) when done
        print(f"INPUTS {doubler.inputs}", flush=True)


if __name__ == "__main__":
    asyncio.run(serve_until_stdin_closes(sys.argv[1]))
