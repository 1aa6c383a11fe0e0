"""A pickle sent to every RPC of every port (router, registry, stage, expert, health, reflection)
as the raw bytes of its request is refused without effect: every one answers INVALID_ARGUMENT
naming the message type it expected (shardmesh.request_guard; grpc.aio alone says UNKNOWN), no
response is sent, the pickle's side effect (creating a marker file) never happens, and the mesh
then still generates the right tokens. Bytes inside messages are read as numbers, never objects."""

import pickle

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardmesh import codec
from shardmesh.client import AsyncClient
from shardmesh.reference import transformers_greedy
from shardmesh.v1 import expert_pb2, tensor_pb2

from wire_helpers import ModuleMesh, raw_call, rpcs_of

PROMPT, NEW_TOKENS = [1, 9, 27, 81], 6


class CreatesMarker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def mesh(mixtral_dir):
    running = ModuleMesh.start(mixtral_dir)
    yield running
    running.stop()


def payloads(marker) -> dict[str, bytes]:
    bomb = CreatesMarker(marker)
    return {f"protocol {p}": pickle.dumps(bomb, protocol=p) for p in (0, 2, 5)}


def expected_type(rpc) -> str:
    """The request message's full name, from the descriptors the servers were built from."""
    from google.protobuf import descriptor_pool
    service, _, method = rpc.path.lstrip("/").rpartition("/")
    return descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method).input_type.full_name


def test_pickle_payload_to_every_rpc_of_every_port_is_refused(mesh, mixtral_dir, tmp_path):
    marker = tmp_path / "unpickled"
    answers = {}

    async def body():
        for kind, addresses in mesh.addresses().items():
            for address in addresses:
                async with grpc.aio.insecure_channel(address) as channel:
                    for rpc in rpcs_of(kind):
                        for name, payload in payloads(marker).items():
                            answers[(address, rpc.name, name)] = (rpc, await raw_call(channel, rpc, payload))
        async with AsyncClient(mesh.address, timeout=60) as client:
            return (await client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids

    tokens = mesh.run(body())
    assert len(answers) == 3 * (len(rpcs_of("router")) + 2 * len(rpcs_of("stage")) + 2 * len(rpcs_of("expert")))
    assert {"Router/Generate", "Registry/RegisterServer", "Stage/Step", "Expert/ComputeExperts", "Health/Check",
            "ServerReflection/ServerReflectionInfo"} <= {rpc_name for _, rpc_name, _ in answers}
    for key, (rpc, (code, details, responses)) in answers.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (key, code, details)
        assert details.startswith(f"request: not a valid {expected_type(rpc)} message"), (key, details)
        assert responses == 0, key
    assert not marker.exists()
    assert tokens == transformers_greedy(mixtral_dir, PROMPT, NEW_TOKENS, ignore_eos=True)

    async def all_serving():
        for addresses in mesh.addresses().values():
            for address in addresses:
                async with grpc.aio.insecure_channel(address) as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING, address
    mesh.run(all_serving())


def test_pickle_inside_a_tensor_is_only_numbers(mesh, tmp_path):
    """A pickle as the data of a float32 tensor: the expert computes on those bytes as floats and
    answers a tensor of the same shape; nothing is unpickled."""
    marker = tmp_path / "unpickled"
    hidden = 64  # mixtral_dir's hidden_size
    payload = pickle.dumps(CreatesMarker(marker))
    data = payload + bytes(-len(payload) % (4 * hidden))         # whole rows of float32
    num_tokens = len(data) // (4 * hidden)
    groups = [expert_pb2.ExpertGroup(layer=0, expert=0, hidden_states=tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[num_tokens, hidden], data=data))]

    async def body():
        async with grpc.aio.insecure_channel(mesh.addresses()["expert"][0]) as channel:
            call = channel.unary_unary("/shardmesh.v1.Expert/ComputeExperts",
                                       request_serializer=expert_pb2.ComputeExpertsRequest.SerializeToString,
                                       response_deserializer=expert_pb2.ComputeExpertsResponse.FromString)
            return await call(expert_pb2.ComputeExpertsRequest(groups=groups), timeout=10)

    reply = mesh.run(body())
    output = codec.decode(reply.outputs[0])
    assert list(output.shape) == [num_tokens, hidden] and output.dtype == torch.float32
    assert not marker.exists()
