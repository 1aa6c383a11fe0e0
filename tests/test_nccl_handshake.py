"""The NCCL links' control-plane handshake (DataPlane.JoinNcclGroup) on the CPU: a fake
communicator class (ranks meet in this process by unique id, tensors go through per-pair queues)
stands in for CuPy's NcclCommunicator, so the id exchange over real gRPC, the ranks, the link
registry, the bad input and the failures are covered without a GPU. The CuPy communicator itself:
tests/test_gpu_nccl.py. Also: which TP group a device gets (NCCL on CUDA, gloo on the CPU)."""

import asyncio
import contextlib
import queue
import secrets
import threading

import grpc
import pytest
import torch

from shardmesh import grpc_util
from shardmesh.nccl_plane import NcclEndpoint, NcclJoinError, check_join, form_link
from shardmesh.shm_server import SERVICE_NAME, DataPlaneServicer
from shardmesh.tp_group import GlooGroup, NcclGroup, group_class
from shardmesh.v1 import dataplane_pb2, dataplane_pb2_grpc

BARRIER_S = 3.0  # a fake rank waits this long for the others (the endpoint's own timeout is shorter)


class FakeCommunicator:
    _rooms: dict[bytes, dict] = {}
    _lock = threading.Lock()

    def __init__(self, world_size: int, unique_id: bytes, rank: int, device: str):
        with self._lock:
            room = self._rooms.setdefault(unique_id, {"barrier": threading.Barrier(world_size), "mail": {},
                                                      "devices": {}})
        room["devices"][rank] = device
        room["barrier"].wait(BARRIER_S)  # as ncclCommInitRank: returns once every rank is in
        self.room, self.rank, self.world_size = room, rank, world_size

    @staticmethod
    def unique_id() -> bytes:
        return secrets.token_bytes(128)

    def _box(self, source: int, target: int) -> queue.Queue:
        with self._lock:
            return self.room["mail"].setdefault((source, target), queue.Queue())

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._box(self.rank, peer).put(tensor.clone())

    def recv(self, tensor: torch.Tensor, peer: int) -> None:
        tensor.copy_(self._box(peer, self.rank).get(timeout=BARRIER_S))


@contextlib.asynccontextmanager
async def servers(count: int, nccl: bool = True, join_timeout_s: float = 10.0):
    """[(endpoint or None, stub)] of `count` DataPlane servers on loopback."""
    started, channels = [], []
    try:
        for _ in range(count):
            endpoint = NcclEndpoint("cpu", FakeCommunicator, join_timeout_s) if nccl else None
            running = await grpc_util.start_server(DataPlaneServicer(None, endpoint),
                                                   dataplane_pb2_grpc.add_DataPlaneServicer_to_server, SERVICE_NAME,
                                                   "127.0.0.1", 0)
            started.append(running)
            channels.append(grpc_util.insecure_channel(running.address))
            channels[-1].endpoint = endpoint
        yield [(c.endpoint, dataplane_pb2_grpc.DataPlaneStub(c)) for c in channels]
    finally:
        for channel in channels:
            await channel.close()
        for running in started:
            await running.stop(None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_a_link_forms_over_grpc_and_carries_tensors_between_ranks():
    async def main():
        async with servers(2) as peers:
            ours = await form_link("stage-0/experts", [stub for _, stub in peers], "cpu", FakeCommunicator)
            theirs = [endpoint.links["stage-0/experts"] for endpoint, _ in peers]
            for peer in (1, 2):  # the sender's rank in the payload: a misrouted tensor fails loudly
                ours.send(torch.full((3, 4), float(10 * peer)), peer)
            received = [torch.empty(3, 4) for _ in theirs]
            for tensor, link in zip(received, theirs):
                link.recv(tensor, 0)
                link.send(tensor + link.rank, 0)  # combine: each answers rank 0
            answers = [torch.empty(3, 4) for _ in theirs]
            for peer, tensor in zip((1, 2), answers):
                ours.recv(tensor, peer)
            return ours, theirs, received, answers

    ours, theirs, received, answers = run(main())
    assert (ours.rank, [link.rank for link in theirs]) == (0, [1, 2])
    assert ours.room is theirs[0].room is theirs[1].room and ours.world_size == 3  # one communicator, one id
    assert [float(t[0, 0]) for t in received] == [10.0, 20.0]
    assert [float(t[0, 0]) for t in answers] == [11.0, 22.0]


def good_request(**fields) -> dataplane_pb2.JoinNcclGroupRequest:
    values = dict(unique_id=bytes(128), world_size=2, rank=1, group="g")
    values.update(fields)
    return dataplane_pb2.JoinNcclGroupRequest(**values)


BAD_JOINS = {
    "short id": (dict(unique_id=b"x" * 127), "unique_id: 127 bytes, not 128"),
    "world of one": (dict(world_size=1, rank=0), "world_size: 1 is not in [2, 1024]"),
    "huge world": (dict(world_size=1 << 20), "world_size: 1048576 is not in [2, 1024]"),
    "rank zero": (dict(rank=0), "rank: 0 is not in [1, 2) (the caller is rank 0)"),
    "rank past the world": (dict(rank=2), "rank: 2 is not in [1, 2) (the caller is rank 0)"),
    "empty group": (dict(group=""), "group: '' is not 1 to 128 of [A-Za-z0-9_.:/-]"),
    "group with a space": (dict(group="a b"), "group: 'a b' is not 1 to 128 of [A-Za-z0-9_.:/-]"),
    "owner with a space": (dict(owner="a b"), "owner: 'a b' is not empty or 1 to 128 of [A-Za-z0-9_.:/-]"),
}


@pytest.mark.parametrize("case", BAD_JOINS)
def test_bad_joins_get_invalid_argument_naming_the_field(case):
    fields, details = BAD_JOINS[case]
    assert check_join(good_request(**fields)) == details

    async def main():
        async with servers(1) as [(endpoint, stub)]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.JoinNcclGroup(good_request(**fields), timeout=5)
            return refused.value, endpoint

    refused, endpoint = run(main())
    assert (refused.code(), refused.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
    assert not endpoint.links


def test_missing_ranks_time_out_and_the_server_serves_on():
    async def main():
        async with servers(1, join_timeout_s=0.3) as [(endpoint, stub)]:
            with pytest.raises(grpc.aio.AioRpcError) as alone:  # rank 1 of 3; nobody else comes
                await stub.JoinNcclGroup(good_request(world_size=3, unique_id=secrets.token_bytes(128)), timeout=5)
            link = await form_link("later", [stub], "cpu", FakeCommunicator)  # still serving
            with pytest.raises(grpc.aio.AioRpcError) as again:  # that group is taken
                await stub.JoinNcclGroup(good_request(group="later"), timeout=5)
            return alone.value, again.value, link, endpoint

    alone, again, link, endpoint = run(main())
    assert alone.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "within 0.3 s" in alone.details()
    assert (again.code(), again.details()) == (grpc.StatusCode.ALREADY_EXISTS, "group: 'later' is already joined here")
    assert link.rank == 0 and set(endpoint.links) == {"later"}


def test_a_server_keeps_one_link_per_owner_and_at_most_max_links(monkeypatch):
    """An owner's new link drops its old one there (a stage re-forming after a failed call, or
    restarted); past MAX_LINKS the least recently used idle link goes. Before, every link stayed
    until the server restarted."""
    monkeypatch.setattr("shardmesh.nccl_plane.MAX_LINKS", 3)

    async def main():
        async with servers(1) as [(endpoint, stub)]:
            await form_link("stage-0/experts/a", [stub], "cpu", FakeCommunicator, owner="stage-0/experts")
            await form_link("stage-1/experts/a", [stub], "cpu", FakeCommunicator, owner="stage-1/experts")
            await form_link("stage-0/experts/b", [stub], "cpu", FakeCommunicator, owner="stage-0/experts")
            after_reform = list(endpoint.links)
            await form_link("anon-1", [stub], "cpu", FakeCommunicator)
            endpoint.used("stage-1/experts/a")  # a call on stage-1's link: stage-0's is now the oldest use
            await form_link("anon-2", [stub], "cpu", FakeCommunicator)
            return after_reform, list(endpoint.links), dict(endpoint.owners), set(endpoint.locks)

    after_reform, links, owners, locks = run(main())
    assert after_reform == ["stage-1/experts/a", "stage-0/experts/b"]
    assert links == ["anon-1", "stage-1/experts/a", "anon-2"] and locks == set(links)
    assert owners == {"stage-1/experts": "stage-1/experts/a"}


def test_a_server_without_a_gpu_refuses_and_the_link_fails_naming_it():
    async def main():
        async with servers(1, nccl=False) as [(_, stub)]:
            with pytest.raises(NcclJoinError) as failed:
                await form_link("g", [stub], "cpu", FakeCommunicator, join_timeout_s=1.0)
            return failed.value

    failed = run(main())
    assert str(failed).startswith("group 'g': rank 1 did not join: FAILED_PRECONDITION this server is not on a CUDA")


def test_shards_on_cuda_get_an_nccl_group_and_shards_on_the_cpu_gloo():
    assert group_class("cuda:0") is NcclGroup and group_class("cuda:3") is NcclGroup
    assert group_class("cpu") is GlooGroup
