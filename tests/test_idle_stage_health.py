"""An active stage server frozen (SIGSTOP) while the router is idle, on the shared-memory data
plane (no Step stream whose keepalive would notice): the router's idle prober
(router/stage_health.py) notices it without any request, turns NOT_SERVING naming the stage, and
refuses new requests at once; continued (SIGCONT), the server registers again and the mesh serves
the same tokens. Real processes on loopback, real signals."""

import asyncio
import os
import signal
import time

import pytest
from grpc_health.v1 import health_pb2

from shardmesh.client import AsyncClient, UnavailableError

from fault_helpers import health_status, launched_mesh, pid_at, stage_info, wait_for

pytestmark = pytest.mark.slow

TOPOLOGY = """
[[stage]]
name = "stage-0"
layers = [0, 2]

[[stage]]
name = "stage-1"
layers = [2, 4]
"""
PROMPT, NEW_TOKENS = [1, 9, 27, 81], 8
# router/stage_health.py: 3 missed probes of 0.5 s period + 2 s deadline (7.5 s), then failover's
# 3 s probe: ~10.5 s; 12 s more for a starved router under load ~10 (its timers fire late, not early).
NOTICED_WITHIN_S = 10.5 + 12.0


def test_an_idle_frozen_stage_is_noticed_without_a_request(llama_dir, tmp_path):
    with launched_mesh(llama_dir, tmp_path, TOPOLOGY) as launcher:

        async def main():
            async with AsyncClient(launcher.router_address, timeout=120) as client:
                baseline = (await client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids
                status = await client.cluster_status()
                stage_1 = next(s for s in status.servers if s.name == "stage-1").address

                async def freed() -> bool:  # idle means idle: the router frees each sequence just after its
                    return not (await stage_info(stage_1)).cached_sequence_ids  # last token went out
                assert await wait_for(freed, 5.0)  # (a free still on its way would wait out its deadline)
                frozen_pid = pid_at(launcher, stage_1)
                os.kill(frozen_pid, signal.SIGSTOP)
                frozen_at = time.monotonic()

                async def not_serving():
                    return not (await client.cluster_status()).serving
                assert await wait_for(not_serving, NOTICED_WITHIN_S + 5.0, interval=0.2)
                noticed = time.monotonic() - frozen_at
                assert noticed < NOTICED_WITHIN_S, noticed
                assert await health_status(launcher.router_address) == health_pb2.HealthCheckResponse.NOT_SERVING
                status = await client.cluster_status()
                assert any("stage-1" in reason for reason in status.unservable), status.unservable
                began = time.monotonic()
                with pytest.raises(UnavailableError, match="stage-1"):
                    await client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS)
                assert time.monotonic() - began < 2.0  # refused at admission, nothing waits

                os.kill(frozen_pid, signal.SIGCONT)  # it re-registers (every 5 s) and serves again

                async def serving():
                    return (await client.cluster_status()).serving
                assert await wait_for(serving, 30.0, interval=0.2)
                again = (await client.generate_all(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)).token_ids
                return baseline, again, noticed

        baseline, again, noticed = asyncio.run(asyncio.wait_for(main(), 180))
        assert again == baseline
        print(f"idle frozen stage noticed after {noticed:.1f} s")
