"""StagePipeline: runs one batch step through every stage over long-lived Step streams.

Hidden states travel from one stage's response into the next stage's request as they came
(bytes are not decoded at the router); only the last stage's logits are decoded."""

import asyncio
import itertools
import logging

import grpc
import torch

from shardmesh import codec
from shardmesh.errors import Unavailable
from shardmesh.grpc_util import CONTROL_DEADLINE_S, insecure_channel
from shardmesh.scheduler import SequenceSlice
from shardmesh.v1 import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)
STEP_DEADLINE_S = 120.0


class StageLink:
    """One stage server: its channel and the current Step stream (reopened after a failure)."""

    def __init__(self, name: str, address: str):
        self.name, self.address = name, address
        self.channel = insecure_channel(address)
        self.stub = stage_pb2_grpc.StageStub(self.channel)
        self._call = None

    async def step(self, request: stage_pb2.StepRequest) -> stage_pb2.StepResponse:
        if self._call is None:
            self._call = self.stub.Step()
        try:
            await self._call.write(request)
            response = await asyncio.wait_for(self._call.read(), STEP_DEADLINE_S)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError, grpc.aio.UsageError) as error:
            self._drop_call()
            detail = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.aio.AioRpcError) else repr(error)
            raise Unavailable("stage", f"stage {self.name} ({self.address}) failed a step: {detail}") from error
        if response is grpc.aio.EOF or response.step_id != request.step_id:
            self._drop_call()
            raise Unavailable("stage", f"stage {self.name} ({self.address}) ended its step stream")
        return response

    def _drop_call(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def free(self, sequence_ids: list[int]) -> None:
        try:
            await self.stub.FreeSequences(stage_pb2.FreeSequencesRequest(sequence_ids=sequence_ids),
                                          timeout=CONTROL_DEADLINE_S)
        except grpc.aio.AioRpcError as error:
            log.warning("freeing %d sequences on %s failed: %s", len(sequence_ids), self.name, error.code().name)

    async def close(self) -> None:
        self._drop_call()
        await self.channel.close()


class StagePipeline:
    def __init__(self):
        self.links: list[StageLink] = []
        self._step_ids = itertools.count(1)

    async def connect(self, stages: list[tuple[str, str]]) -> None:
        """(name, address) of each stage in order; reopens links whose address changed."""
        old = {link.name: link for link in self.links}
        links = []
        for name, address in stages:
            link = old.pop(name, None)
            if link is None or link.address != address:
                if link is not None:
                    await link.close()
                link = StageLink(name, address)
            links.append(link)
        for link in old.values():
            await link.close()
        self.links = links

    async def step(self, slices: list[SequenceSlice], token_ids: torch.Tensor) -> torch.Tensor:
        step_id = next(self._step_ids)
        sequences = [stage_pb2.SequenceSlice(sequence_id=s.sequence_id, start_position=s.start_position,
                                             num_tokens=s.num_tokens) for s in slices]
        request = stage_pb2.StepRequest(step_id=step_id, sequences=sequences, token_ids=codec.encode(token_ids))
        for link in self.links[:-1]:
            response = await link.step(request)
            request = stage_pb2.StepRequest(step_id=step_id, sequences=sequences, hidden_states=response.hidden_states)
        response = await self.links[-1].step(request)
        return codec.decode(response.logits, "logits")  # [B, V]

    async def free(self, sequence_ids: list[int]) -> None:
        if sequence_ids:
            await asyncio.gather(*(link.free(sequence_ids) for link in self.links))

    async def close(self) -> None:
        for link in self.links:
            await link.close()
