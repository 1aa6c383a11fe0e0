"""A request over the router's size limit gets RESOURCE_EXHAUSTED without the router allocating it:
the router runs as a process of its own (`shardmesh router`), so that its peak resident memory
(VmHWM in /proc/PID/status) can be read, and stays well below the refused message's size; then
it still serves the reference tokens (its stages and expert servers run in this process)."""

import asyncio
import dataclasses
import pathlib
import subprocess
import sys
import time

import grpc
import pytest

from shardmesh import grpc_util
from shardmesh.local_mesh import LocalMesh
from shardmesh.reference import transformers_greedy
from shardmesh.service_config import ServiceConfig
from shardmesh.v1 import router_pb2, router_pb2_grpc

from router.main import MAX_REQUEST_BYTES

MESSAGE_BYTES = 64 * 2**20  # 8x the router's limit (MAX_REQUEST_BYTES, 8 MiB)
PROMPT, NEW_TOKENS = [1, 9, 27, 81], 6
# Growth of the router's peak RSS allowed while it refuses two such messages: a quarter of one.
# (grpc reads the 5-byte length prefix and refuses the message from it; what it does buffer is
# bounded by HTTP/2 flow control, a few MiB at most.)
MAX_GROWTH_BYTES = MESSAGE_BYTES // 4


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS of process `pid`, in KiB."""
    fields = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.fixture(scope="module")
def router_process(mixtral_dir, tmp_path_factory):
    port_file = tmp_path_factory.mktemp("router") / "port"
    process = subprocess.Popen([sys.executable, "-m", "shardmesh.cli", "router", "--model", str(mixtral_dir),
                                "--port", "0", "--port-file", str(port_file), "--no-auth"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the router wrote no port within 60 s"
            time.sleep(0.05)
        yield process, f"127.0.0.1:{int(port_file.read_text())}"
    finally:
        process.kill()
        process.wait(timeout=30)


async def start_servers(model_dir, router_address: str) -> LocalMesh:
    """The default topology's stages and expert servers, in this process, registered with the router."""
    from expert_server.main import start_expert_server
    from stage_server.main import start_stage_server
    base = ServiceConfig(model_dir=model_dir, router_address=router_address)
    mesh = LocalMesh(None, [], [])
    for spec in base.topology.stages:
        mesh.stages.append(await start_stage_server(dataclasses.replace(base, name=spec.name)))
    for spec in base.topology.expert_servers:
        mesh.experts.append(await start_expert_server(dataclasses.replace(base, name=spec.name)))
    await grpc_util.wait_for_health(router_address, 60)
    return mesh


async def generate(address: str) -> list[int]:
    async with grpc_util.insecure_channel(address) as channel:
        call = router_pb2_grpc.RouterStub(channel).Generate(router_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True), timeout=60)
        return [response.token_id async for response in call]


async def refusals(address: str) -> list[grpc.aio.AioRpcError]:
    """Generate and RegisterServer, each with a MESSAGE_BYTES request (the client's own send limit raised)."""
    options = [("grpc.max_send_message_length", 2 * MESSAGE_BYTES)]
    errors = []
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        huge = "a" * MESSAGE_BYTES
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in router_pb2_grpc.RouterStub(channel).Generate(
                    router_pb2.GenerateRequest(prompt_text=huge, max_new_tokens=1), timeout=60):
                pass
        errors.append(refused.value)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await router_pb2_grpc.RegistryStub(channel).RegisterServer(
                router_pb2.RegisterServerRequest(name=huge), timeout=60)
        errors.append(refused.value)
    return errors


def test_message_over_the_limit_is_refused_without_allocating_it(router_process, mixtral_dir):
    process, address = router_process
    loop = asyncio.new_event_loop()
    mesh = None
    try:
        mesh = loop.run_until_complete(start_servers(mixtral_dir, address))
        before_tokens = loop.run_until_complete(generate(address))
        before = memory_kib(process.pid)
        errors = loop.run_until_complete(refusals(address))
        after = memory_kib(process.pid)
        after_tokens = loop.run_until_complete(generate(address))
    finally:
        if mesh is not None:
            for server in (*mesh.stages, *mesh.experts):
                loop.run_until_complete(server.stop(grace=None))
        loop.close()
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert str(MAX_REQUEST_BYTES) in error.details(), error.details()
    growth = (after["VmHWM"] - before["VmHWM"]) * 1024
    print(f"router VmHWM {before['VmHWM']} -> {after['VmHWM']} KiB (+{growth / 2**20:.1f} MiB) while refusing "
          f"2 x {MESSAGE_BYTES / 2**20:.0f} MiB; VmRSS {before['VmRSS']} -> {after['VmRSS']} KiB")
    assert growth < MAX_GROWTH_BYTES, (before, after)
    assert process.poll() is None
    assert before_tokens == after_tokens == transformers_greedy(mixtral_dir, PROMPT, NEW_TOKENS, ignore_eos=True)
