"""Streams ending early and the router stopping, as `shardmesh up` runs the mesh (real processes,
real signals). Cancelled streams: their KV is freed on every stage within 1 s, the others are
unaffected. SIGTERM of the router: health NOT_SERVING and new requests refused at once, the
streams in flight finish with the same tokens, the router exits 0, and the launcher then stops
every service (no orphans)."""

import asyncio
import os
import pathlib
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from shardmesh.client import AsyncClient, UnavailableError
from shardmesh.v1 import router_pb2, stage_pb2, stage_pb2_grpc

from fault_helpers import faulted_run, health_status, run_stream
from test_cli_processes import processes_mentioning, shardmesh_up, wait_for_line, wait_gone

pytestmark = pytest.mark.slow
PROMPTS = [[1] + [20 + 5 * i + j for j in range(3 + i)] for i in range(4)]
NEW_TOKENS = 160
# 16 prompts of distinct lengths 2..17: a stage's SequenceHistory tells them apart by the tokens of
# their first step (a whole prompt: the 8 of a lane hold at most 108 < the 128-token prefill budget).
CANCEL_PROMPTS = [[1] + [40 + 2 * i + j for j in range(1 + i)] for i in range(16)]
# At load ~10: the sequence leaves after its lane's step in progress (milliseconds of work here,
# a few hundred ms when a process waits for a core), then one FreeSequences per stage on loopback.
FREED_WITHIN_S = 1.0


class KVWatch:
    """Polls every stage's GetStageInfo (one channel each) every 10 ms while running."""

    def __init__(self, addresses: list[str]):
        self.channels = [grpc.aio.insecure_channel(address) for address in addresses]
        self.infos: list = []

    async def poll(self) -> list:
        self.infos = await asyncio.gather(*(stage_pb2_grpc.StageStub(c).GetStageInfo(
            stage_pb2.GetStageInfoRequest(), timeout=10) for c in self.channels))
        return self.infos

    def sequence_of(self, prompt: list[int], exclude: set[int]) -> int | None:
        """The id of the sequence whose first step on stage 0 was `prompt` (not one of `exclude`)."""
        return next((h.sequence_id for h in self.infos[0].sequence_history if h.sequence_id not in exclude
                     and h.first_start_position == 0 and h.first_num_tokens == len(prompt)), None) if self.infos else None

    def cached(self) -> set[int]:
        return {i for info in self.infos for i in info.cached_sequence_ids}

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def cancel_half(client: AsyncClient, stages: list[str]) -> tuple[list, dict[int, float]]:
    """Stream all CANCEL_PROMPTS; cancel the even ones after their first token. Returns the odd
    ones' results and, per cancelled sequence, seconds from its cancel until no stage held its KV."""
    watch = KVWatch(stages)
    before = {h.sequence_id for h in (await watch.poll())[0].sequence_history}
    cancelled_at: dict[int, float] = {}  # prompt index -> when its stream was cancelled
    freed_after: dict[int, float] = {}

    async def cancel_after_first_token(index: int):
        async with client.generate(CANCEL_PROMPTS[index], max_new_tokens=200, ignore_eos=True) as stream:
            async for _ in stream:
                break  # leaving the `async with` cancels the call
        cancelled_at[index] = time.monotonic()

    kept = [asyncio.create_task(run_stream(client, p, 48)) for p in CANCEL_PROMPTS[1::2]]
    cancels = asyncio.gather(*(cancel_after_first_token(i) for i in range(0, 16, 2)))
    ids: dict[int, int] = {}
    give_up = time.monotonic() + 60
    while len(freed_after) < 8 and time.monotonic() < give_up:  # bounded; the caller checks all 8
        await watch.poll()
        now, cached = time.monotonic(), watch.cached()
        for index in range(0, 16, 2):
            if index not in ids and (found := watch.sequence_of(CANCEL_PROMPTS[index], before)) is not None:
                ids[index] = found
            if index in cancelled_at and index in ids and index not in freed_after and ids[index] not in cached:
                freed_after[index] = now - cancelled_at[index]
        await asyncio.sleep(0.01)
    await cancels
    results = await asyncio.gather(*kept)
    await watch.close()
    return results, freed_after


def command_line(pid: int) -> list[str]:
    return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_cancelled_streams_freed_then_router_sigterm_drains_and_mesh_stops(llama_dir, tmp_path):
    with shardmesh_up(llama_dir, tmp_path, "--no-auth") as (up, lines, model):
        address = wait_for_line(lines, "router listening on", timeout=150).split()[3]
        services = set(processes_mentioning(str(model))) - {up.pid}
        routers = [pid for pid in services if "router" in command_line(pid)]
        assert len(services) == 3 and len(routers) == 1  # router and 2 stages, real pids

        async def main():
            async with AsyncClient(address, timeout=60) as client:
                # 8 of 16 streams cancelled after their first token; the other 8 are unaffected.
                stages = [s.address for s in (await client.cluster_status()).servers
                          if s.role == router_pb2.SERVER_ROLE_STAGE]  # in pipeline order
                alone = [r.tokens for r in await asyncio.gather(*(run_stream(client, p, 48)
                                                                    for p in CANCEL_PROMPTS[1::2]))]
                kept, freed_after = await cancel_half(client, stages)
                assert len(freed_after) == 8 and max(freed_after.values()) < FREED_WITHIN_S, freed_after
                assert [r.error for r in kept] == [None] * 8 and [r.tokens for r in kept] == alone

                # SIGTERM of the router while 4 streams run.
                baseline = [r.tokens for r in await asyncio.gather(*(run_stream(client, p, NEW_TOKENS)
                                                                       for p in PROMPTS))]
                streams = asyncio.create_task(faulted_run(client, PROMPTS, NEW_TOKENS,
                                                          lambda: os.kill(routers[0], signal.SIGTERM)))
                while not (streams.done() or await health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING):
                    await asyncio.sleep(0.02)  # bounded: the streams end within the grace period
                draining_seen = time.monotonic()
                with pytest.raises(UnavailableError, match="shutting down"):
                    await client.generate_all(PROMPTS[0], max_new_tokens=4)
                results, sigterm_time = await streams
                # NOT_SERVING within a second of the signal (the handler's first act; at load ~10
                # the router process may wait a few hundred ms for a core), while streams still ran.
                assert draining_seen - sigterm_time < 2.0
                assert all(r.ended_at > draining_seen for r in results)
                assert [r.error for r in results] == [None] * len(PROMPTS)
                assert [r.tokens for r in results] == baseline  # finished within the grace period

        asyncio.run(asyncio.wait_for(main(), 120))
        # The router exited 0; the launcher saw it go and stopped the stages.
        wait_for_line(lines, "error: router exited with code 0", timeout=30)
        assert up.wait(timeout=30) == 1
        assert wait_gone(model) == []
        assert not [pid for pid in services if pathlib.Path(f"/proc/{pid}").exists()
                    and (pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z")]
