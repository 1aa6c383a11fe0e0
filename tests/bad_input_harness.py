"""What the bad-input tests share: a tiny seeded Mixtral checkpoint, one in-process mesh per test
module on one event loop (every service a grpc.aio server on loopback, ports from the OS, ready by
grpc.health.v1), and the two checks every test makes: the server answered a precise status naming
the field, and the mesh still serves (a greedy generation gives the tokens it gave before)."""

import asyncio
import dataclasses
import pathlib

import grpc
import pytest
import torch

from shardmesh import codec, grpc_util
from shardmesh.local_mesh import LocalMesh, start_local_mesh
from shardmesh.topology import ExpertServerSpec, StageSpec, Topology
from shardmesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc, stage_pb2, stage_pb2_grpc

VOCAB, HIDDEN, MAX_POSITIONS, MAX_CONTEXT = 128, 32, 256, 64
SHAPE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=MAX_POSITIONS)
# Split by layer so that experts-b holds no expert of layer 0 and experts-a not (1, 3); (1, 1) has two replicas.
TOPOLOGY = Topology(
    stages=(StageSpec("stage-0", 0, 1), StageSpec("stage-1", 1, 2)),
    expert_servers=(ExpertServerSpec("experts-a", ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1))),
                    ExpertServerSpec("experts-b", ((1, 1), (1, 2), (1, 3)))))
PROMPT, NEW_TOKENS = [5, 17, 42, 99], 6            # the generation checked after every bad input
LONG_PROMPT, LONG_NEW_TOKENS = [7, 3, 60], 48      # one kept in flight across bad inputs
BAD_SEQUENCE_ID = 1_000_000                         # sequence ids the tests send to stages directly (router: 1, 2, ...)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="session")
def tiny_moe_model(make_model_dir) -> pathlib.Path:
    """No tokenizer: text prompts must be refused."""
    return make_model_dir("mixtral", seed=7, with_tokenizer=False, **SHAPE)


@dataclasses.dataclass
class MeshHarness:
    loop: asyncio.AbstractEventLoop
    mesh: LocalMesh
    reference: list[int]        # PROMPT greedy, NEW_TOKENS tokens, taken before any bad input
    long_reference: list[int]   # LONG_PROMPT greedy, LONG_NEW_TOKENS tokens

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def stage(self, index: int) -> str:
        return f"127.0.0.1:{self.mesh.stages[index].port}"

    def expert(self, index: int) -> str:
        return f"127.0.0.1:{self.mesh.experts[index].port}"

    async def expect_serving(self) -> None:
        """The mesh still gives the reference tokens, and no stage caches a sequence a bad step named."""
        assert await generate(self.mesh.address, PROMPT, NEW_TOKENS) == self.reference
        for index in range(len(self.mesh.stages)):
            async with grpc_util.insecure_channel(self.stage(index)) as channel:
                info = await stage_pb2_grpc.StageStub(channel).GetStageInfo(stage_pb2.GetStageInfoRequest(), timeout=10)
            assert not [i for i in info.cached_sequence_ids if i >= BAD_SEQUENCE_ID], info


@pytest.fixture(scope="module")
def harness(tiny_moe_model):
    loop = asyncio.new_event_loop()
    mesh = loop.run_until_complete(start_local_mesh(tiny_moe_model, TOPOLOGY, max_context=MAX_CONTEXT))
    try:
        reference = loop.run_until_complete(generate(mesh.address, PROMPT, NEW_TOKENS))
        long_reference = loop.run_until_complete(generate(mesh.address, LONG_PROMPT, LONG_NEW_TOKENS))
        assert len(reference) == NEW_TOKENS and len(long_reference) == LONG_NEW_TOKENS
        yield MeshHarness(loop, mesh, reference, long_reference)
    finally:
        loop.run_until_complete(mesh.stop())
        loop.close()


def generate_request(prompt: list[int], max_new_tokens: int) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=max_new_tokens, ignore_eos=True)


async def generate(address: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    async with grpc_util.insecure_channel(address) as channel:
        call = router_pb2_grpc.RouterStub(channel).Generate(generate_request(prompt, max_new_tokens), timeout=30)
        return [response.token_id async for response in call]


async def call_error(call) -> grpc.aio.AioRpcError:
    """Await a unary call, or drain a streaming one (which must yield nothing); return the error it ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            responses = [response async for response in call]
            assert not responses, responses
        else:
            await call
    return info.value


def assert_status(error: grpc.aio.AioRpcError, code: grpc.StatusCode, field: str) -> None:
    """The status is `code` and its details start with the field's name ("field: why")."""
    assert (error.code(), error.details().split(":")[0]) == (code, field), error.details()


def tensor(values, dtype: torch.dtype = torch.float32):
    return codec.encode(torch.as_tensor(values, dtype=dtype))


def hidden_states(num_tokens: int, width: int = HIDDEN, dtype: torch.dtype = torch.float32, seed: int = 0):
    return codec.encode(torch.randn(num_tokens, width, generator=torch.Generator().manual_seed(seed)).to(dtype))


async def step_error(address: str, request: stage_pb2.StepRequest) -> grpc.aio.AioRpcError:
    async with grpc_util.insecure_channel(address) as channel:
        return await call_error(stage_pb2_grpc.StageStub(channel).Step(iter([request]), timeout=10))


async def compute_experts(address: str, request: expert_pb2.ComputeExpertsRequest,
                          timeout: float = 30) -> expert_pb2.ComputeExpertsResponse:
    async with grpc_util.insecure_channel(address) as channel:
        return await expert_pb2_grpc.ExpertStub(channel).ComputeExperts(request, timeout=timeout)
