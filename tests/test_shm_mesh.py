"""The shared-memory data plane of real stage servers: every bad step of test_bad_input_servers.py,
sent over shared memory instead of gRPC, gets the same precise status; the session's Step stream
starts afresh after each error, as a gRPC stream would be reopened; and the mesh keeps serving."""

import grpc
import pytest
import torch

from bad_input_harness import (BAD_SEQUENCE_ID, HIDDEN, INVALID, assert_status, harness, step_error,  # noqa: F401
                               tiny_moe_model)
from shardmesh import codec, grpc_util
from shardmesh.data_planes import DataPlanes
from shardmesh.shm_plane import DataPlaneError
from shardmesh.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2
from test_bad_input_servers import BAD_STEPS, ids, step

STEP = "shardmesh.v1.Stage/Step"


async def shm_step(address: str, planes: DataPlanes, channel, request: stage_pb2.StepRequest):
    """Send `request` as it is over the stage's shared-memory plane: (response, None) or (None, DataPlaneError)."""
    shm = await planes.get(address, channel)
    assert shm is not None, "the stage offers no shared-memory plane"
    async with shm.session() as call:
        try:
            return await call.invoke(STEP, request, stage_pb2.StepResponse, 10), None
        except DataPlaneError as error:
            return None, error


@pytest.mark.parametrize("case", BAD_STEPS)
def test_bad_step_over_shared_memory(harness, case):
    stage, request, code, field = BAD_STEPS[case]
    address = harness.stage(stage)

    async def body():
        planes = DataPlanes(enabled=True)
        async with grpc_util.insecure_channel(address) as channel:
            response, error = await shm_step(address, planes, channel, request)
            assert response is None and error.code == code and error.details.split(":")[0] == field, error
            good = step([(BAD_SEQUENCE_ID + 7, 0, 2)], ids([5, 6])) if stage == 0 else \
                step([(BAD_SEQUENCE_ID + 7, 0, 2)], hidden=codec.encode(torch.ones(2, HIDDEN)))
            response, error = await shm_step(address, planes, channel, good)  # the same session, a new stream
            assert error is None and response.step_id == good.step_id, error
            await planes.close()
            await stage_pb2_grpc.StageStub(channel).FreeSequences(
                stage_pb2.FreeSequencesRequest(sequence_ids=[BAD_SEQUENCE_ID + 7]), timeout=10)
        await harness.expect_serving()

    harness.run(body())


def test_a_shared_memory_span_over_grpc_is_refused(harness):
    span = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, HIDDEN],
                             shm=tensor_pb2.SharedMemorySpan(offset=64, length=4 * HIDDEN))

    async def body():
        error = await step_error(harness.stage(1), step([(BAD_SEQUENCE_ID, 0, 1)], hidden=span))
        assert_status(error, INVALID, "hidden_states.shm")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        await harness.expect_serving()

    harness.run(body())
