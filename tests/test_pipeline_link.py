"""StageLink with several steps in flight on one Step stream: answers reach their callers in order,
and a stream that fails fails every step in flight with UNAVAILABLE; the next step opens a new one."""

import asyncio

import grpc
import pytest
import torch

from router.stage_link import StageLink
from shardmesh import codec, grpc_util
from shardmesh.errors import Unavailable
from shardmesh.v1 import stage_pb2, stage_pb2_grpc

FAIL_STEP = 13


class SlowEchoStage(stage_pb2_grpc.StageServicer):
    """Answers each step with its hidden states plus its step id, a little later; aborts at FAIL_STEP."""

    def __init__(self):
        self.streams = 0

    async def Step(self, request_iterator, context):
        self.streams += 1
        async for request in request_iterator:
            await asyncio.sleep(0.01)
            if request.step_id == FAIL_STEP:
                await context.abort(grpc.StatusCode.INTERNAL, "step 13 broke")
            hidden = codec.decode(request.hidden_states, "hidden_states") + request.step_id
            yield stage_pb2.StepResponse(step_id=request.step_id, hidden_states=codec.encode(hidden))


async def run_link(step_ids: list[int]):
    servicer = SlowEchoStage()
    running = await grpc_util.start_server(servicer, stage_pb2_grpc.add_StageServicer_to_server,
                                           "shardmesh.v1.Stage", "127.0.0.1", 0)
    link = StageLink("echo", running.address)
    sequences = [stage_pb2.SequenceSlice(sequence_id=1, start_position=0, num_tokens=1)]

    async def one(step_id: int):
        try:
            output, refused = await link.forward(step_id, sequences, "hidden_states", torch.zeros(1, 4))
            assert refused == []  # StepResponse.refused: none here
            return float(codec.decode(output, "output", segment=None)[0, 0])
        except Unavailable as error:
            return error

    try:
        results = await asyncio.gather(*(one(i) for i in step_ids))
        after = await one(100)  # a fresh stream
    finally:
        await link.close()
        await running.stop(None)
    return results, after, servicer.streams


def test_steps_in_flight_are_answered_in_order():
    results, after, streams = asyncio.run(asyncio.wait_for(run_link([1, 2, 3, 4, 5]), 30))
    assert results == [1.0, 2.0, 3.0, 4.0, 5.0] and after == 100.0 and streams == 1


def test_a_failed_stream_fails_every_step_in_flight_then_reopens():
    results, after, streams = asyncio.run(asyncio.wait_for(run_link([11, 12, FAIL_STEP, 14, 15]), 30))
    assert results[:2] == [11.0, 12.0]
    for error in results[2:]:
        assert isinstance(error, Unavailable) and error.code == "UNAVAILABLE", error
    assert "step 13 broke" in str(results[2])
    assert after == 100.0 and streams == 2


@pytest.mark.parametrize("bad", ["wrong step id", "unasked answer"])
def test_answers_out_of_turn_end_the_stream(bad):
    class Confused(SlowEchoStage):
        async def Step(self, request_iterator, context):
            self.streams += 1
            async for request in request_iterator:
                step_id = request.step_id + 1 if bad == "wrong step id" else request.step_id
                yield stage_pb2.StepResponse(step_id=step_id, hidden_states=request.hidden_states)
                if bad == "unasked answer":
                    yield stage_pb2.StepResponse(step_id=999, hidden_states=request.hidden_states)

    async def main():
        servicer = Confused()
        running = await grpc_util.start_server(servicer, stage_pb2_grpc.add_StageServicer_to_server,
                                               "shardmesh.v1.Stage", "127.0.0.1", 0)
        link = StageLink("confused", running.address)
        sequences = [stage_pb2.SequenceSlice(sequence_id=1, start_position=0, num_tokens=1)]
        results = []
        try:
            for step_id in (1, 2):
                try:
                    results.append(await link.forward(step_id, sequences, "hidden_states", torch.zeros(1, 4)))
                except Unavailable as error:
                    results.append(error)
                await asyncio.sleep(0.05)  # let an unasked answer arrive
        finally:
            await link.close()
            await running.stop(None)
        return results, servicer.streams

    results, streams = asyncio.run(asyncio.wait_for(main(), 30))
    if bad == "wrong step id":  # the step waiting for its answer fails at once
        assert all(isinstance(r, Unavailable) and "where" in str(r) for r in results), results
    else:  # the answers came, but the link no longer trusts the stream
        assert not any(isinstance(r, Unavailable) for r in results), results
    assert streams == 2


class GreedyStage(stage_pb2_grpc.StageServicer):
    """A last stage answering greedy_token_ids when asked (`extra` ids more than it should), logits otherwise."""

    def __init__(self, extra: int):
        self.extra = extra

    async def Step(self, request_iterator, context):
        async for request in request_iterator:
            count = len(request.sequences)
            if request.greedy_token_ids:
                yield stage_pb2.StepResponse(step_id=request.step_id, greedy_token_ids=range(3, 3 + count + self.extra))
            else:
                yield stage_pb2.StepResponse(step_id=request.step_id, logits=codec.encode(torch.zeros(count, 8)))

    async def GetStageInfo(self, request, context):
        return stage_pb2.StageInfo(name="greedy")


@pytest.mark.parametrize("extra", [0, 1, -1])
def test_greedy_token_ids_come_back_one_per_sequence(extra):
    from router.pipeline import StagePipeline
    from shardmesh.sampling import GreedyTokens
    from shardmesh.sequence import SequenceSlice

    async def main():
        running = await grpc_util.start_server(GreedyStage(extra), stage_pb2_grpc.add_StageServicer_to_server,
                                               "shardmesh.v1.Stage", "127.0.0.1", 0)
        pipeline = StagePipeline()
        try:
            await pipeline.connect([("greedy", running.address)])
            slices = [SequenceSlice(1, 0, 2), SequenceSlice(2, 0, 1)]
            logits = await pipeline.step(slices, torch.tensor([1, 2, 3]))
            try:
                return logits, await pipeline.step(slices, torch.tensor([1, 2, 3]), greedy=True)
            except Unavailable as error:
                return logits, error
        finally:
            await pipeline.close()
            await running.stop(None)

    logits, greedy = asyncio.run(asyncio.wait_for(main(), 30))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 8)  # not asked: logits as before
    if extra == 0:
        assert greedy == GreedyTokens([3, 4])
    else:
        assert isinstance(greedy, Unavailable) and "greedy token ids for a step of 2 sequences" in str(greedy)
