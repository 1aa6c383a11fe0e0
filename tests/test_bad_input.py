"""Bad input to the router over the real wire: each gets a precise status naming the field, and the
mesh keeps serving the same tokens. (Stage and expert servers: test_bad_input_servers.py.)"""

import math

import grpc
import pytest

from bad_input_harness import (FAILED, INVALID, MAX_CONTEXT, NOT_FOUND, PROMPT, TOPOLOGY, VOCAB, assert_status,
                               call_error, harness, tiny_moe_model)  # noqa: F401  (fixtures)
from shardmesh import grpc_util
from shardmesh.v1 import router_pb2, router_pb2_grpc

STAGE, EXPERT = router_pb2.SERVER_ROLE_STAGE, router_pb2.SERVER_ROLE_EXPERT


def sampling(**fields) -> dict:
    return dict(prompt_token_ids=PROMPT, max_new_tokens=4, sampling=router_pb2.SamplingParams(**fields))


# (GenerateRequest fields, expected code, field named in the details)
BAD_GENERATE = {
    "empty_prompt": (dict(max_new_tokens=4), INVALID, "prompt_token_ids"),
    "ids_and_text": (dict(prompt_token_ids=PROMPT, prompt_text="hello", max_new_tokens=4), INVALID, "prompt_text"),
    "negative_token_id": (dict(prompt_token_ids=[5, -1, 6], max_new_tokens=4), INVALID, "prompt_token_ids[1]"),
    "token_id_at_vocab": (dict(prompt_token_ids=[5, 6, VOCAB], max_new_tokens=4), INVALID, "prompt_token_ids[2]"),
    "token_id_huge": (dict(prompt_token_ids=[2**62], max_new_tokens=4), INVALID, "prompt_token_ids[0]"),
    "zero_max_new_tokens": (dict(prompt_token_ids=PROMPT, max_new_tokens=0), INVALID, "max_new_tokens"),
    "past_context_limit": (dict(prompt_token_ids=PROMPT, max_new_tokens=MAX_CONTEXT - len(PROMPT) + 1),
                           INVALID, "max_new_tokens"),
    "prompt_fills_context": (dict(prompt_token_ids=[5] * MAX_CONTEXT, max_new_tokens=1), INVALID, "prompt_token_ids"),
    "top_p_zero": (sampling(temperature=1.0, top_p=0.0), INVALID, "sampling.top_p"),
    "top_p_above_one": (sampling(temperature=1.0, top_p=1.5), INVALID, "sampling.top_p"),
    "top_p_nan": (sampling(temperature=1.0, top_p=math.nan), INVALID, "sampling.top_p"),
    "negative_temperature": (sampling(temperature=-0.5), INVALID, "sampling.temperature"),
    "nan_temperature": (sampling(temperature=math.nan), INVALID, "sampling.temperature"),
    "infinite_temperature": (sampling(temperature=math.inf), INVALID, "sampling.temperature"),
    "negative_stop_token": (dict(prompt_token_ids=PROMPT, max_new_tokens=4, stop_token_ids=[2, -3]),
                            INVALID, "stop_token_ids[1]"),
    "stop_token_at_vocab": (dict(prompt_token_ids=PROMPT, max_new_tokens=4, stop_token_ids=[VOCAB]),
                            INVALID, "stop_token_ids[0]"),
    "text_without_tokenizer": (dict(prompt_text="hello", max_new_tokens=4), FAILED, "prompt_text"),
}


@pytest.mark.parametrize("case", BAD_GENERATE)
def test_generate_refuses(harness, case):
    fields, code, field = BAD_GENERATE[case]

    async def body():
        async with grpc_util.insecure_channel(harness.mesh.address) as channel:
            call = router_pb2_grpc.RouterStub(channel).Generate(router_pb2.GenerateRequest(**fields), timeout=10)
            assert_status(await call_error(call), code, field)
        await harness.expect_serving()

    harness.run(body())


def genuine_registration(harness, name: str) -> dict:
    """RegisterServerRequest fields exactly as the running server `name` registered itself."""
    spec = TOPOLOGY.server(name)
    fields = dict(name=name, model_fingerprint=harness.mesh.router.state.config.fingerprint)
    if name.startswith("stage"):
        port = harness.mesh.stages[TOPOLOGY.stages.index(spec)].port
        return fields | dict(role=STAGE, address=f"127.0.0.1:{port}",
                             layers=router_pb2.LayerRange(start=spec.start_layer, end=spec.end_layer))
    port = harness.mesh.experts[TOPOLOGY.expert_servers.index(spec)].port
    return fields | dict(role=EXPERT, address=f"127.0.0.1:{port}",
                         experts=[router_pb2.ExpertKey(layer=l, expert=e) for l, e in spec.experts])


# (server, changes to its genuine registration, expected code, field named in the details)
BAD_REGISTRATION = {
    "unknown_name": ("stage-1", dict(name="stage-9"), NOT_FOUND, "name"),
    "empty_name": ("stage-1", dict(name=""), NOT_FOUND, "name"),
    "wrong_layer_range": ("stage-1", dict(layers=router_pb2.LayerRange(start=0, end=2)), FAILED, "layers"),
    "stage_as_expert": ("stage-0", dict(role=EXPERT), FAILED, "role"),
    "unspecified_role": ("stage-0", dict(role=router_pb2.SERVER_ROLE_UNSPECIFIED), FAILED, "role"),
    "expert_as_stage": ("experts-b", dict(role=STAGE), FAILED, "role"),
    "missing_expert": ("experts-b", dict(experts=[router_pb2.ExpertKey(layer=1, expert=2)]), FAILED, "experts"),
    "wrong_expert": ("experts-b", dict(experts=[router_pb2.ExpertKey(layer=l, expert=e)
                                                for l, e in [(1, 1), (1, 2), (0, 3)]]), FAILED, "experts"),
    "wrong_fingerprint": ("experts-a", dict(model_fingerprint="0123456789abcdef"), FAILED, "model_fingerprint"),
    # holds_assignment: a live placement's experts are taken as reported, but only inside the model
    "assigned_layer_outside": ("experts-b", dict(holds_assignment=True, experts=[router_pb2.ExpertKey(layer=99, expert=0)]),
                               INVALID, "experts[0]"),
    "assigned_expert_outside": ("experts-b", dict(holds_assignment=True, experts=[router_pb2.ExpertKey(layer=0, expert=99)]),
                                INVALID, "experts[0]"),
    "empty_address": ("stage-1", dict(address=""), INVALID, "address"),
    "address_without_port": ("stage-1", dict(address="127.0.0.1"), INVALID, "address"),
    "address_empty_port": ("stage-1", dict(address="127.0.0.1:"), INVALID, "address"),
    "address_without_host": ("stage-1", dict(address=":50051"), INVALID, "address"),
    "address_port_not_a_number": ("experts-a", dict(address="127.0.0.1:http"), INVALID, "address"),
    "address_port_zero": ("experts-a", dict(address="127.0.0.1:0"), INVALID, "address"),
    "address_port_too_large": ("experts-a", dict(address="127.0.0.1:70000"), INVALID, "address"),
}


@pytest.mark.parametrize("case", BAD_REGISTRATION)
def test_register_refuses(harness, case):
    name, changes, code, field = BAD_REGISTRATION[case]
    request = router_pb2.RegisterServerRequest(**(genuine_registration(harness, name) | changes))

    async def body():
        async with grpc_util.insecure_channel(harness.mesh.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            before = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=10)
            registry = router_pb2_grpc.RegistryStub(channel)
            assert_status(await call_error(registry.RegisterServer(request, timeout=10)), code, field)
            after = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=10)
        assert after == before  # nothing re-pointed, placement version unchanged
        await harness.expect_serving()

    harness.run(body())


def test_genuine_reregistration_is_accepted(harness):
    """The base every refusal above perturbs is itself valid (so each refusal is about its one field)."""
    async def body():
        async with grpc_util.insecure_channel(harness.mesh.address) as channel:
            request = router_pb2.RegisterServerRequest(**genuine_registration(harness, "stage-1"))
            await router_pb2_grpc.RegistryStub(channel).RegisterServer(request, timeout=10)
        await harness.expect_serving()

    harness.run(body())
