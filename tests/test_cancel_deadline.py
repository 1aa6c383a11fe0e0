"""A client deadline ends the work on every service: the router cancels the sequence when the
deadline passes, it leaves the batch at its lane's next step and its KV cache is freed on every
stage (observed over the wire with GetStageInfo). In-process mesh over real gRPC. (Cancelled
streams: tests/test_router_shutdown.py, with real processes.)"""

import asyncio
import time

import grpc
import pytest

from shardmesh.client import AsyncClient, DeadlineExceededError
from shardmesh.v1 import stage_pb2, stage_pb2_grpc

from fault_helpers import stage_info
from mesh_helpers import local_mesh, topology

# "Shortly after": the sequence leaves after its lane's step in progress (milliseconds of work for
# this model), then one FreeSequences call per stage. Here every service shares one process: at
# load ~10 that process waits for a core between steps (measured: 0.1 s idle, 1.1 s at load 13).
ENDED_WITHIN_S = 2.0


async def cached_anywhere(stubs, sequence_ids: set[int]) -> set[int]:
    """Which of `sequence_ids` some stage still holds KV for (asked over the wire)."""
    infos = await asyncio.gather(*(stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10) for stub in stubs))
    return sequence_ids & {i for info in infos for i in info.cached_sequence_ids}


def test_client_deadline_ends_the_work_on_every_service(llama_dir):
    async def main():
        async with local_mesh(llama_dir, topology([(0, 2), (2, 4)])) as mesh:
            async with AsyncClient(mesh.address) as client:
                prompt, new_tokens = [1, 30, 31, 32], 508  # up to the context limit (512)
                channels = [grpc.aio.insecure_channel(s.address) for s in mesh.stages]  # polled below
                stubs = [stage_pb2_grpc.StageStub(channel) for channel in channels]
                await cached_anywhere(stubs, set())  # connected
                await client.generate_all(prompt, max_new_tokens=4, ignore_eos=True)  # sequence 1: one-time costs
                warm = time.monotonic()
                await client.generate_all(prompt, max_new_tokens=16, ignore_eos=True)  # sequence 2
                # A deadline about an eighth of the way through the generation, however fast this machine:
                # room for the machine to get 8x faster between the timing and the generation (other
                # processes on 2 cores stopping), which a quarter's margin did not always leave.
                timeout = min(5.0, max(0.3, 64 * (time.monotonic() - warm) / 16))
                began = time.monotonic()
                with pytest.raises(DeadlineExceededError):
                    await client.generate_all(prompt, max_new_tokens=new_tokens, ignore_eos=True, timeout=timeout)
                deadline = began + timeout  # the client's deadline is at or after this
                scheduler = mesh.router.state.scheduler
                while (scheduler.active or (await cached_anywhere(stubs, {3}))) and time.monotonic() - deadline < 10:
                    await asyncio.sleep(0.01)
                ended_after = time.monotonic() - deadline
                for channel in channels:
                    await channel.close()
                assert ended_after < ENDED_WITHIN_S, ended_after  # the router's work and every stage's KV

                async def steps_of_3():
                    infos = await asyncio.gather(*(stage_info(s.address) for s in mesh.stages))
                    return [next(h.steps for h in info.sequence_history if h.sequence_id == 3) for info in infos]
                steps = await steps_of_3()
                assert all(0 < n < new_tokens for n in steps), steps  # it ran on every stage, and stopped early
                await asyncio.sleep(0.3)
                assert await steps_of_3() == steps  # no stage stepped it again

    asyncio.run(asyncio.wait_for(main(), 60))
