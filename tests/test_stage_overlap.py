"""A stage runs steps of different sequences at once (stage_server/step_gate.py): with one stage and
two micro-batches, one step's attention runs while the other awaits its experts, over shared memory
(a pooled session per step in flight) and over gRPC (read ahead on the Step stream), and the
tokens are still transformers' own. Steps of one sequence written back to back run in order."""

import asyncio
import contextlib

import pytest
import torch

from mesh_helpers import check_against_reference, generate_staggered, local_mesh, topology
from shardmesh import codec, grpc_util
from shardmesh.v1 import stage_pb2, stage_pb2_grpc
from test_mesh_oracle import MAX_NEW_TOKENS, PROMPTS


class OverlapProbe:
    """Wraps a stage's ExpertBackend: the most expert calls (of different steps) in flight at once."""

    def __init__(self, backend):
        self.backend, self.now, self.most = backend, 0, 0

    async def run(self, layer, groups):
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            return await self.backend.run(layer, groups)
        finally:
            self.now -= 1

    @contextlib.asynccontextmanager
    async def lend(self, layer):  # (moe_block's way in: its call counts while it is awaited)
        async with self.backend.lend(layer) as lent:
            yield CountedLent(self, lent)

    def __getattr__(self, name):  # update(), close(): the wrapped backend's
        return getattr(self.backend, name)


class CountedLent:
    """A backend's lend context, its run counted by the probe."""

    def __init__(self, probe: OverlapProbe, lent):
        self.probe, self.lent = probe, lent

    def rows(self, count, width, dtype):
        return self.lent.rows(count, width, dtype)

    async def run(self, groups):
        self.probe.now += 1
        self.probe.most = max(self.probe.most, self.probe.now)
        try:
            return await self.lent.run(groups)
        finally:
            self.probe.now -= 1


@pytest.mark.parametrize("data_plane", ["shm", "grpc"])
def test_one_stage_two_micro_batches_overlap_and_match_transformers(mixtral_dir, data_plane):
    prompts = [[t % 160 for t in p] for p in PROMPTS]

    async def main():
        async with local_mesh(mixtral_dir, topology([(0, 4)], [list(range(8))]), data_plane=data_plane,
                              router_options=dict(micro_batches=2)) as mesh:
            servicer = mesh.stages[0].servicer
            probe = servicer.backend = OverlapProbe(servicer.backend)
            results = await generate_staggered(mesh.address, prompts, MAX_NEW_TOKENS, join_after=1)
            planes = mesh.router.state.pipeline.data_planes
            sessions = [len(pool.sessions) for pool in planes._channels.values() if pool is not None]
            return results, probe.most, sessions, servicer.gate.busy

    results, most, sessions, busy = asyncio.run(asyncio.wait_for(main(), 120))
    assert most >= 2, "no two steps were ever in flight at the stage at once"
    assert busy == 0
    if data_plane == "shm":
        assert sessions and max(sessions) >= 2, f"the router never had two sessions with the stage: {sessions}"
    check_against_reference(mixtral_dir, prompts, results, MAX_NEW_TOKENS, f"one stage, 2 micro-batches, {data_plane}")


def test_steps_of_one_sequence_written_back_to_back_run_in_order(mixtral_dir):
    """A client may write a sequence's next step before the previous one has answered (the stream
    reads ahead): it waits for that step, then continues from its cache. The outputs equal those
    of the same steps taken one at a time on another sequence."""
    tokens = [1, 17, 33, 5]

    def request(step_id, sequence_id, start, ids):
        return stage_pb2.StepRequest(step_id=step_id, sequences=[stage_pb2.SequenceSlice(
            sequence_id=sequence_id, start_position=start, num_tokens=len(ids))],
            token_ids=codec.encode(torch.tensor(ids, dtype=torch.int64)))

    async def main():
        async with local_mesh(mixtral_dir, topology([(0, 4)], [list(range(8))]), data_plane="grpc") as mesh:
            async with grpc_util.insecure_channel(mesh.stages[0].address) as channel:
                stub = stage_pb2_grpc.StageStub(channel)
                together = stub.Step(timeout=60)
                for step_id, start, ids in [(1, 0, tokens[:3]), (2, 3, tokens[3:])]:
                    await together.write(request(step_id, 500, start, ids))  # both written before any answer
                back_to_back = [await together.read() for _ in range(2)]
                await together.done_writing()
                one_by_one = []
                for step_id, start, ids in [(3, 0, tokens[:3]), (4, 3, tokens[3:])]:
                    call = stub.Step(iter([request(step_id, 501, start, ids)]), timeout=60)
                    one_by_one += [response async for response in call]
                info = await stub.GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
                await stub.FreeSequences(stage_pb2.FreeSequencesRequest(sequence_ids=[500, 501]), timeout=10)
            return back_to_back, one_by_one, info

    back_to_back, one_by_one, info = asyncio.run(asyncio.wait_for(main(), 120))
    assert [r.step_id for r in back_to_back] == [1, 2]
    for ours, theirs in zip(back_to_back, one_by_one):
        assert torch.equal(codec.decode(ours.logits, "logits", segment=None),
                           codec.decode(theirs.logits, "logits", segment=None))
    history = {h.sequence_id: h for h in info.sequence_history}
    assert history[500].tokens_received == 4 and history[500].steps == 2
