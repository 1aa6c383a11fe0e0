"""Stage servers killed and frozen under load, as real processes (`shardmesh up`'s launcher) on
loopback, with real signals: a standby takes over and every running sequence's tokens are replayed
to rebuild the KV caches (router/failover.py, shardmesh/scheduler.py); the last server of a layer
range dying ends every stream with UNAVAILABLE and turns the router NOT_SERVING; a frozen server
that is continued comes back and serves again."""

import asyncio
import os
import signal
import time

import pytest
from grpc_health.v1 import health_pb2

from shardmesh.client import AsyncClient, UnavailableError

from fault_helpers import faulted_run, health_status, launched_mesh, pid_at, run_stream, stage_info, wait_for

pytestmark = pytest.mark.slow

TOPOLOGY = """
[[stage]]
name = "stage-0"
layers = [0, 2]

[[stage]]
name = "stage-1"
layers = [2, 4]
standbys = 2
"""
STEP_TIMEOUT_S = 3.0  # the router's --step-timeout here (production default 10 s)
PROMPTS = [[1] + [10 + 7 * i + j for j in range(4 + i)] for i in range(6)]  # distinct lengths 5..10
NEW_TOKENS = 96


def stage_1(status):
    return next(s for s in status.servers if s.name == "stage-1")


async def check_replayed_once(address: str, baseline: list[list[int]]) -> None:
    """The server at `address` took over mid-generation: it was sent each sequence's whole prefix
    once, from position 0, and went on from there (Petals #503/#587: twice, or the wrong position)."""
    async def freed() -> list | None:  # the router frees a sequence just after its last token reached the client
        history = (await stage_info(address)).sequence_history
        return history if history and all(entry.frees for entry in history) else None

    history = await wait_for(freed, 5.0) or (await stage_info(address)).sequence_history  # 5 s: load ~10
    assert len(history) == len(PROMPTS)  # it was idle before: only these sequences
    # Every position of prompt + generated but the last token, once: a prefix sent twice (or a
    # step at a wrong position, which the stage refuses) would change this sum.
    by_prompt_length = {entry.tokens_received - (NEW_TOKENS - 1): entry for entry in history}
    assert sorted(by_prompt_length) == sorted(len(p) for p in PROMPTS)
    for length, entry in by_prompt_length.items():
        assert entry.first_start_position == 0
        # Its first step was the replay: the prompt and >= 1 generated token (mid-generation), in
        # one step (--prefill-chunk-tokens 0); the rest were single decode steps.
        assert length + 1 <= entry.first_num_tokens <= length + NEW_TOKENS - 1, (length, entry)
        assert entry.steps == 1 + (length + NEW_TOKENS - 1 - entry.first_num_tokens)
        assert entry.frees == 1  # freed once, when it finished


def test_stage_killed_frozen_then_last_holder_dies(llama_dir, tmp_path):
    router_args = ["--step-timeout", str(STEP_TIMEOUT_S), "--prefill-chunk-tokens", "0"]
    with launched_mesh(llama_dir, tmp_path, TOPOLOGY, router_args) as launcher:
        assert len(launcher.processes) == 5  # router, stage-0, stage-1 and its 2 standbys

        async def main():
            async with AsyncClient(launcher.router_address, timeout=120) as client:
                status = await client.cluster_status()
                assert status.serving and len(stage_1(status).replica_addresses) == 3
                baseline = [r.tokens for r in await asyncio.gather(*(run_stream(client, p, NEW_TOKENS)
                                                                       for p in PROMPTS))]

                # 1. SIGKILL of the active stage-1 server mid-generation: the first standby takes over.
                killed = stage_1(status).address
                results, _ = await faulted_run(client, PROMPTS, NEW_TOKENS,
                                               lambda: os.kill(pid_at(launcher, killed), signal.SIGKILL))
                assert [r.error for r in results] == [None] * len(PROMPTS)
                assert [r.tokens for r in results] == baseline
                assert all(r.indexes == list(range(NEW_TOKENS)) for r in results)  # nothing lost or repeated
                status = await client.cluster_status()
                assert status.serving and killed not in stage_1(status).replica_addresses
                first_standby = stage_1(status).address
                await check_replayed_once(first_standby, baseline)

                # 2. SIGSTOP of that server: a step passes its deadline, the health probe gets no
                # answer, the second standby takes over. Bound: STEP_TIMEOUT_S + 0.05 s per token of
                # the stuck step (<= 6 decode tokens) + router/failover.py's 3 s probe = 6.3 s; 4 s
                # more for a starved router under load ~10 (its timers fire late, not early).
                frozen_pid = pid_at(launcher, first_standby)
                stopped = asyncio.create_task(faulted_run(client, PROMPTS, NEW_TOKENS,
                                                          lambda: os.kill(frozen_pid, signal.SIGSTOP)))

                polled_until = time.monotonic() + 60
                while (first_standby in stage_1(await client.cluster_status()).replica_addresses
                       and not stopped.done() and time.monotonic() < polled_until):
                    await asyncio.sleep(0.05)
                switched_at = time.monotonic()  # an upper bound: polled after the switch
                results, fault_time = await stopped
                detected = switched_at - fault_time
                assert detected < STEP_TIMEOUT_S + 0.3 + 3.0 + 4.0, detected
                assert [r.error for r in results] == [None] * len(PROMPTS)
                assert [r.tokens for r in results] == baseline
                second_standby = stage_1(await client.cluster_status()).address
                await check_replayed_once(second_standby, baseline)

                # 3. SIGKILL of the last server of layers [2, 4): every stream ends UNAVAILABLE
                # within 5 s (the kill is seen at once: connection refused), health turns
                # NOT_SERVING, the status says why, new requests are refused at once.
                results, fault_time = await faulted_run(
                    client, PROMPTS, 400, lambda: os.kill(pid_at(launcher, second_standby), signal.SIGKILL))
                assert all(isinstance(r.error, UnavailableError) for r in results), [r.error for r in results]
                assert max(r.ended_at for r in results) - fault_time < 5.0
                assert await health_status(launcher.router_address) == health_pb2.HealthCheckResponse.NOT_SERVING
                status = await client.cluster_status()
                assert not status.serving and len(status.unservable) == 1
                assert "stage 'stage-1' (layers [2, 4)) has no live server" in status.unservable[0]
                began = time.monotonic()
                with pytest.raises(UnavailableError, match="stage-1.*no live server"):
                    await client.generate_all(PROMPTS[0], max_new_tokens=4)
                assert time.monotonic() - began < 2.0  # refused at admission, nothing waits

                # 4. SIGCONT of the frozen server: it goes on and registers again (every 5 s,
                # shardmesh/registration.py), the only server of stage-1 now. The KV it holds from
                # phase 2 is stale: the router frees it before any step (StageLink.reset), and the
                # mesh serves again with the same tokens.
                os.kill(frozen_pid, signal.SIGCONT)

                async def back():
                    status = await client.cluster_status()
                    return status.serving and stage_1(status).address == first_standby
                assert await wait_for(back, 30)
                results = await asyncio.gather(*(run_stream(client, p, NEW_TOKENS) for p in PROMPTS))
                assert [r.tokens for r in results] == baseline

                async def cached() -> list[int]:  # freed just after each last token reached its client
                    return list((await stage_info(first_standby)).cached_sequence_ids)

                async def none_cached() -> bool:
                    return not await cached()
                assert await wait_for(none_cached, 5.0), await cached()  # 5 s: load ~10
            return frozen_pid

        frozen_pid = asyncio.run(asyncio.wait_for(main(), 240))
        frozen = next(p for p in launcher.processes.values() if p.pid == frozen_pid)
        assert frozen.poll() is None  # continued: alive until the launcher stops (and reaps) it
    assert frozen.returncode is not None
