"""Pooled shared-memory sessions (shardmesh/shm_pool.py): several calls to one server in flight at
once, each on its own session, no more sessions than calls at once (and at most max_sessions), a
session that broke mid-call replaced while the others go on."""

import asyncio
import contextlib

import grpc
import pytest
import torch

from shardmesh import codec, grpc_util
from shardmesh.data_planes import DataPlanes
from shardmesh.shm_plane import DataPlaneError
from shardmesh.shm_server import SERVICE_NAME, DataPlaneServicer, Method, ShmPlaneServer
from shardmesh.v1 import dataplane_pb2_grpc, expert_pb2

HOLD = "test.Gate/Hold"


class Gate:
    """Answers each call (its input + 1) only once `release` is set; counts calls inside at once."""

    def __init__(self):
        self.release = asyncio.Event()
        self.inside = 0
        self.most_inside = 0
        self.arrived = asyncio.Condition()

    async def Hold(self, request, context):
        x = codec.decode(request.groups[0].hidden_states, "groups[0].hidden_states")
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        async with self.arrived:
            self.arrived.notify_all()
        try:
            await self.release.wait()
        finally:
            self.inside -= 1
        return expert_pb2.ComputeExpertsResponse(outputs=[codec.encode(x + 1)])

    async def wait_inside(self, count: int) -> None:
        async with self.arrived:
            await self.arrived.wait_for(lambda: self.inside >= count)


@contextlib.asynccontextmanager
async def gate_server():
    gate = Gate()
    plane = ShmPlaneServer("test", {HOLD: Method(expert_pb2.ComputeExpertsRequest, gate.Hold)})
    await plane.start()
    running = await grpc_util.start_server(DataPlaneServicer(plane), dataplane_pb2_grpc.add_DataPlaneServicer_to_server,
                                           SERVICE_NAME, "127.0.0.1", 0)
    channel = grpc_util.insecure_channel(running.address)
    try:
        yield gate, plane, channel, running.address
    finally:
        await channel.close()
        await running.stop(None)
        await plane.stop()


async def call(pool, value: float, timeout: float = 10.0) -> tuple[float, object]:
    """(the server's answer, the session that carried it)."""
    async with pool.session() as shm:
        request = expert_pb2.ComputeExpertsRequest(groups=[
            expert_pb2.ExpertGroup(layer=0, expert=0, hidden_states=shm.encode(torch.full((2, 4), value)))])
        reply = await shm.invoke(HOLD, request, expert_pb2.ComputeExpertsResponse, timeout)
        return float(shm.decode(reply.outputs[0], "outputs[0]")[0, 0]), shm.channel


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_calls_to_one_server_are_in_flight_at_once_each_on_its_own_session():
    async def main():
        async with gate_server() as (gate, _, channel, address):
            planes = DataPlanes(enabled=True, max_sessions=3)
            pool = await planes.get(address, channel)
            calls = [asyncio.create_task(call(pool, float(i))) for i in range(5)]
            await gate.wait_inside(3)  # three calls reached the server before any was answered
            await asyncio.sleep(0.2)   # the other two wait for a session (none beyond max_sessions opens)
            inside, opened = gate.inside, len(pool.sessions)
            gate.release.set()
            results = await asyncio.gather(*calls)
            again = await call(pool, 9.0)  # an idle session is reused: none opens
            sessions = list(pool.sessions)
            await planes.close()
            return inside, opened, results, again, sessions, gate.most_inside

    inside, opened, results, again, sessions, most_inside = run(main())
    assert inside == 3 and opened == 3 and most_inside == 3
    assert [value for value, _ in results] == [1.0, 2.0, 3.0, 4.0, 5.0]  # each call got its own answer
    assert len({id(session) for _, session in results}) == 3
    assert again[0] == 10.0 and len(sessions) == 3 and again[1] in sessions


def test_one_call_at_a_time_keeps_one_session():
    async def main():
        async with gate_server() as (gate, _, channel, address):
            gate.release.set()
            planes = DataPlanes(enabled=True)
            pool = await planes.get(address, channel)
            for i in range(4):
                await call(pool, float(i))
            count = len(pool.sessions)
            await planes.close()
            return count

    assert run(main()) == 1


def test_a_call_cut_mid_way_breaks_only_its_session_and_the_other_call_goes_on():
    async def main():
        async with gate_server() as (gate, _, channel, address):
            planes = DataPlanes(enabled=True, max_sessions=2)
            pool = await planes.get(address, channel)
            kept = asyncio.create_task(call(pool, 1.0))
            cut = asyncio.create_task(call(pool, 2.0))
            await gate.wait_inside(2)
            cut.cancel()  # its reply would come later, out of step: that session must not be reused
            with pytest.raises(asyncio.CancelledError):
                await cut
            left = list(pool.sessions)
            gate.release.set()
            kept_value, kept_session = await kept
            after_value, after_session = await call(pool, 5.0)
            await planes.close()
            return left, kept_value, kept_session, after_value, after_session

    left, kept_value, kept_session, after_value, after_session = run(main())
    assert left == [kept_session]  # the cut session was closed at once, the busy one kept
    assert kept_value == 2.0 and after_value == 6.0  # each answer its own call's, none the cut one's


def test_a_server_gone_fails_the_calls_then_sessions_are_negotiated_again():
    async def main():
        async with gate_server() as (gate, plane, channel, address):
            gate.release.set()
            planes = DataPlanes(enabled=True)
            pool = await planes.get(address, channel)
            await asyncio.gather(call(pool, 0.0), call(pool, 0.0))
            before = list(pool.sessions)
            await plane.stop()  # every session closed by the server
            await plane.start()  # back (a new socket name: offered again)
            with pytest.raises(DataPlaneError) as failed:
                await call(pool, 0.0)
            broken_all = all(s.segment.buffer.closed for s in before) and not pool.sessions
            fresh = await planes.get(address, channel)
            value, _ = await call(fresh, 3.0)
            await planes.close()
            return failed.value, broken_all, fresh is not pool, value

    failed, broken_all, replaced, value = run(main())
    assert failed.code == grpc.StatusCode.UNAVAILABLE
    assert broken_all and replaced and value == 4.0


def test_idle_session_only_when_a_call_can_start_at_once():
    """DataPlanes.ready / ShmPool.idle_session (the stage's expert calls skip the negotiation bound with
    them): a pool only once negotiated, a session only while an idle one is whole and big enough."""
    async def main():
        async with gate_server() as (gate, _, channel, address):
            gate.release.set()
            planes = DataPlanes(enabled=True, max_sessions=2)
            assert planes.ready(address) is None  # not negotiated yet
            pool = await planes.get(address, channel)
            assert planes.ready(address) is pool and DataPlanes(enabled=False).ready(address) is None
            seen = [pool.idle_session() is not None]          # the first session, idle
            async with pool.session():
                seen.append(pool.idle_session() is not None)  # in a call: none idle
            [session] = pool.sessions
            session.wanted = session.segment.size + 1        # too small for the next call
            seen.append(pool.idle_session() is not None)
            session.wanted = 0
            session.broken = True
            seen.append(pool.idle_session() is not None)
            session.broken = False
            async with pool.idle_session() as taken:          # entered at once, the idle session
                seen.append(taken.channel is session)
            await planes.close()
            seen.append(pool.idle_session() is not None)      # closed
            return seen

    assert run(main()) == [True, False, False, False, True, False]
