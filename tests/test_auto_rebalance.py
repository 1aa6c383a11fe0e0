"""The router's automatic mode: once the imbalance has stayed above the threshold for `patience`
checks it rebalances, once; the new placement is balanced, so it does not rebalance again, and
generation gives the same tokens before and after."""

import asyncio

import pytest

from shardmesh.client import AsyncClient

from router.auto_rebalance import AutoRebalanceConfig

from mesh_helpers import local_mesh
from placement_helpers import SPARE_TOPOLOGY, cluster_status

PROMPTS = [[1, 5, 9, 13], [1, 20, 31, 4, 4], [1, 7]]


async def generate_all(address: str) -> list[list[int]]:
    async with AsyncClient(address, timeout=120) as client:
        generations = await asyncio.gather(*(client.generate_all(p, max_new_tokens=10, ignore_eos=True) for p in PROMPTS))
    return [[t.token_id for t in g.tokens] for g in generations]


@pytest.mark.parametrize("kwargs", [dict(threshold=1.0), dict(threshold=1.5, window_s=601), dict(threshold=2, patience=0)])
def test_config_is_validated(kwargs):
    with pytest.raises(ValueError, match="auto-rebalance"):
        AutoRebalanceConfig(**kwargs)


def test_auto_rebalance_acts_once_when_imbalance_persists(mixtral_dir):
    config = AutoRebalanceConfig(threshold=1.3, interval_s=0.05, window_s=600, patience=3, min_tokens=50)

    async def main():
        async with local_mesh(mixtral_dir, SPARE_TOPOLOGY, router_options={"auto_rebalance": config}) as mesh:
            auto = mesh.router.state.auto_rebalancer
            start = await cluster_status(mesh.address, load=False)
            assert auto.rebalances == 0
            before = await generate_all(mesh.address)  # experts-2 holds nothing: imbalance >= 1.5
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while auto.rebalances == 0:
                assert loop.time() < deadline, "no automatic rebalance within 30 s"
                await asyncio.sleep(0.05)
            changed = await cluster_status(mesh.address)
            assert changed.placement_version == start.placement_version + 1
            assert {s.name: s.experts for s in changed.expert_servers}["experts-2"] > 0
            assert await auto.current_imbalance() < config.threshold
            await asyncio.sleep(20 * config.interval_s)  # many more checks: balanced now, nothing to do
            after = await generate_all(mesh.address)
            assert auto.rebalances == 1
            assert (await cluster_status(mesh.address, load=False)).placement_version == changed.placement_version
            return before, after

    before, after = asyncio.run(main())
    assert after == before
