"""A layer whose every expert lies, unreplicated, on one expert server (1 stage + 1 expert server) is
called without the spread and failover machinery's general path (stage_server/remote_experts.py):
the same calls, failovers, down marks and errors as the general path; the packed groups go out as
one tensor (PackedRows) and their answer combines with the same bits as per-expert outputs."""

import asyncio

import pytest
import torch

from shardmesh.errors import Unavailable
from shardmesh.models import moe_kernel
from shardmesh.models.moe import MoEGate, combine
from shardmesh.models.packed_rows import PackedRows

from stage_server.remote_experts import MAX_ATTEMPTS, Placement, RemoteExperts, ServerFailed
from stage_server.replica_spread import sole_servers

HIDDEN = 32


def test_packed_rows_reads_as_a_mapping():
    rows = torch.arange(6 * HIDDEN, dtype=torch.float32).view(6, HIDDEN)
    groups = PackedRows(rows, (1, 4, 6), (2, 1, 3))
    assert list(groups) == [1, 4, 6] and len(groups) == 3 and 4 in groups and 5 not in groups
    assert torch.equal(groups[4], rows[2:3]) and torch.equal(groups[6], rows[3:])
    assert [e for e, _ in groups.items()] == [1, 4, 6] and groups.get(5) is None
    assert PackedRows(rows[:0], (), ()) == {}
    with pytest.raises(TypeError):
        groups[4] = rows[:1]  # read-only


def test_sole_servers():
    replicas = {(0, 0): ("a",), (0, 1): ("a",), (1, 0): ("a", "b"), (1, 1): ("a",), (2, 0): ("a",), (2, 1): ("b",)}
    assert sole_servers(replicas) == {0: ("a", frozenset({0, 1}))}


@pytest.fixture
def moe_kernel_on(monkeypatch):
    """The MoE kernel switched on for one test (whatever SHARDMESH_MOE_KERNEL the run set), as it was after."""
    monkeypatch.delenv("SHARDMESH_MOE_KERNEL", raising=False)
    moe_kernel._functions.cache_clear()
    yield
    monkeypatch.undo()
    moe_kernel._functions.cache_clear()


@pytest.mark.parametrize("num_tokens", [1, 5, 16])
def test_packed_answer_combines_with_the_same_bits(num_tokens, moe_kernel_on):
    """combine of a PackedRows answer (one tensor, read in place by the kernel) == combine of the same
    outputs as separate per-expert tensors."""
    generator = torch.Generator().manual_seed(num_tokens)
    gate = MoEGate(torch.randn(8, HIDDEN, generator=generator), 2)
    hidden_states = torch.randn(num_tokens, HIDDEN, generator=generator)  # [T, H]
    residual = torch.randn(num_tokens, HIDDEN, generator=generator)       # [T, H]
    groups, handle = gate.dispatch(hidden_states)
    assert handle.routing is not None, "the MoE kernel did not route (no C compiler?)"
    assert type(groups) is PackedRows and groups.experts == handle.experts
    answer = torch.sin(groups.rows * 3.0)  # [T*K, H]: each row its own "expert output"
    separate = {e: torch.sin(x * 3.0).clone() for e, x in groups.items()}
    before = moe_kernel.calls["combine"]
    ours = combine(PackedRows(answer, groups.experts, groups.counts), handle, residual)
    assert moe_kernel.calls["combine"] == before + 1
    assert torch.equal(ours, combine(separate, handle, residual))
    assert torch.equal(combine(PackedRows(answer, groups.experts, groups.counts), handle),
                       combine(separate, handle))


class ScriptedServer:
    """RemoteExperts._call's stand-in: answers each packed call with its rows * 2, or fails the first
    `failures` calls (ServerFailed, as a dead or frozen server does)."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, []

    async def __call__(self, address, packed, lent=None):
        self.calls.append((address, list(packed.experts), list(packed.counts)))
        if len(self.calls) <= self.failures:
            raise ServerFailed(f"expert server {address} failed layer {packed.layer}: UNAVAILABLE scripted")
        return packed.hidden_states * 2  # [N, H]


async def scripted_run(failures: int, general: bool, groups) -> tuple:
    experts = RemoteExperts(data_plane="grpc")
    await experts.update(Placement(1, {(0, e): ("127.0.0.1:1",) for e in range(8)}))
    if general:
        experts._sole = {}  # the general path: spread, assign, with_failover from its first round
    server = experts._call = ScriptedServer(failures)
    try:
        try:
            outputs = await experts.run(0, groups)
            answer = {e: outputs[e] for e in groups}
        except Unavailable as error:
            answer = str(error)
        return answer, server.calls, experts.failovers, sorted(experts._down), experts._turns
    finally:
        await experts.close()


@pytest.mark.parametrize("failures", [0, 1, MAX_ATTEMPTS - 1, MAX_ATTEMPTS])
def test_one_server_path_is_the_general_path(failures):
    """Answers, calls made, failovers counted, servers marked down and the error after MAX_ATTEMPTS:
    all as the general path's."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(7, HIDDEN, generator=generator)  # [7, H]
    for groups in (PackedRows(rows, (1, 3, 6), (3, 1, 3)), {1: rows[:3], 3: rows[3:4], 6: rows[4:]}):
        fast = asyncio.run(scripted_run(failures, False, groups))
        general = asyncio.run(scripted_run(failures, True, groups))
        fast_answer, general_answer = fast[0], general[0]
        if failures < MAX_ATTEMPTS:
            assert all(torch.equal(fast_answer[e], general_answer[e]) and torch.equal(fast_answer[e], groups[e] * 2)
                       for e in groups)
        else:
            assert fast_answer == general_answer and f"after {MAX_ATTEMPTS} attempts" in fast_answer
        assert fast[1:] == general[1:]
        assert len(fast[1]) == min(failures + 1, MAX_ATTEMPTS) and fast[2] == 3 * min(failures, MAX_ATTEMPTS)


def test_lend_sends_the_groups_and_reads_the_answer_where_they_lie(mixtral_dir):
    """RemoteExperts.lend (moe_block's way in) over shared memory: the groups are written straight into
    the session's segment (lent.rows) and sent from there (the answer follows them at once: no copy
    of the request was placed in between), the outputs are the answer where it lies (no copy), the
    session stays taken until the block ends (no other call can write over them), then it is idle
    again; run's outputs are copies, of the same bits."""
    from shardmesh.service_config import ServiceConfig
    from shardmesh.shm_segment import align
    from expert_server.main import start_expert_server

    async def main():
        server = await start_expert_server(ServiceConfig(model_dir=mixtral_dir, name="experts-a", data_plane="shm"))
        experts = RemoteExperts(data_plane="shm")  # experts-a holds experts 0..4 of every layer
        try:
            await experts.update(Placement(1, {(0, e): (server.address,) for e in range(5)}))
            data = torch.randn(7, 64, generator=torch.Generator().manual_seed(5))  # [7, H]
            copied = await experts.run(0, PackedRows(data, (0, 2, 4), (3, 1, 3)))  # (negotiates the plane)
            pool = experts.data_planes.ready(server.address)
            [session] = pool.sessions
            start = session.segment._bytes.data_ptr()
            in_segment = lambda tensor: start <= tensor.data_ptr() < start + session.segment.size  # noqa: E731
            async with experts.lend(0) as lent:
                rows = lent.rows(7, 64, torch.float32)  # [7, H]
                rows.copy_(data)  # (as MoEGate.dispatch(out=rows) writes them)
                outputs = await lent.run(PackedRows(rows, (0, 2, 4), (3, 1, 3)))
                inside = (in_segment(rows), type(outputs) is PackedRows, in_segment(outputs.rows),
                          outputs.rows.data_ptr() == rows.data_ptr() + align(rows.numel() * 4), pool.idle_session() is None)
                same = all(torch.equal(outputs[e], copied[e]) for e in (0, 2, 4))
            return inside, same, pool.idle_session() is not None, pool.sessions == [session], in_segment(copied[0])
        finally:
            await experts.close()
            await server.stop(grace=None)

    inside, same, idle_after, one_session, copy_in_segment = asyncio.run(asyncio.wait_for(main(), 60))
    assert inside == (True, True, True, True, True) and same and idle_after and one_session and not copy_in_segment


def test_lend_fails_over_like_run(mixtral_dir, monkeypatch):
    """A lent call whose shared-memory plane breaks goes round again as run's would (a new session,
    the groups re-sent from a copy: their rows were in the broken session's segment), with the same
    answer and failovers counted."""
    from shardmesh.service_config import ServiceConfig
    from shardmesh.shm_plane import DataPlaneError, ShmCall
    from expert_server.main import start_expert_server
    import grpc

    invoke, broken = ShmCall.invoke, []

    async def breaks_once(self, *args):
        if not broken:
            broken.append(self.channel)
            self.channel.broken = True  # as a cut socket leaves it
            raise DataPlaneError(grpc.StatusCode.UNAVAILABLE, "scripted: the plane broke")
        return await invoke(self, *args)

    async def main():
        server = await start_expert_server(ServiceConfig(model_dir=mixtral_dir, name="experts-a", data_plane="shm"))
        experts = RemoteExperts(data_plane="shm")
        try:
            await experts.update(Placement(1, {(0, e): (server.address,) for e in range(5)}))
            data = torch.randn(7, 64, generator=torch.Generator().manual_seed(6))  # [7, H]
            expected = await experts.run(0, PackedRows(data, (0, 2, 4), (3, 1, 3)))
            monkeypatch.setattr(ShmCall, "invoke", breaks_once)
            async with experts.lend(0) as lent:
                rows = lent.rows(7, 64, torch.float32)
                rows.copy_(data)
                outputs = await lent.run(PackedRows(rows, (0, 2, 4), (3, 1, 3)))
                same = all(torch.equal(outputs[e], expected[e]) for e in (0, 2, 4))
            pool = experts.data_planes.ready(server.address)
            return same, experts.failovers, len(broken), broken[0] not in pool.sessions
        finally:
            await experts.close()
            await server.stop(grace=None)

    assert asyncio.run(asyncio.wait_for(main(), 60)) == (True, 3, 1, True)
