"""ShmGroup: the shared-memory AllReduce of same-host TP ranks == the sum, identical on every rank,
over many steps (both banks reused); tensors larger than a slot go through gloo; a missing peer is
an error within the timeout."""

import concurrent.futures
import threading
import time

import pytest
import torch

from shardmesh.shm_allreduce import ShmGroup
from shardmesh.tp_group import TPJoinError
from tp_helpers import gloo_groups

pytestmark = pytest.mark.skipif(not ShmGroup.supported(), reason="needs x86-64 and /dev/shm")


def on_every_rank(function, world_size: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(world_size) as pool:
        return [f.result() for f in [pool.submit(function, rank) for rank in range(world_size)]]


@pytest.mark.parametrize("world_size, chunked_min_bytes", [(2, 1 << 30), (4, 1 << 30), (2, 0), (4, 1024)])
def test_shm_all_reduce_sums_in_rank_order(world_size, chunked_min_bytes):
    """One-phase sums, chunked (two-phase) sums, and a mix of both (1024: tensors from 1 KiB on)."""
    groups = gloo_groups(world_size, timeout_s=30)
    shms = on_every_rank(lambda r: ShmGroup.over(groups[r], capacity=4096, timeout_s=10), world_size)
    for shm in shms:
        shm.chunked_min_bytes = chunked_min_bytes
    shapes = [(3, 5), (7,), (2, 64), (1023,), (1024,), (2000,)]  # the last is 8000 bytes > 4096: gloo fallback

    def run(rank: int) -> list[torch.Tensor]:
        results = []
        for step, shape in enumerate(shapes * 3):
            part = torch.randn(shape, generator=torch.Generator().manual_seed(100 * step + rank))
            results.append(shms[rank].all_reduce(part.clone()))
        return results

    per_rank = on_every_rank(run, world_size)
    for step, shape in enumerate(shapes * 3):
        parts = [torch.randn(shape, generator=torch.Generator().manual_seed(100 * step + r)) for r in range(world_size)]
        expected = parts[0].clone()
        for part in parts[1:]:
            expected += part
        for rank in range(world_size):
            assert torch.allclose(per_rank[rank][step], expected, rtol=1e-6, atol=1e-6), (step, rank)
            assert torch.equal(per_rank[rank][step], per_rank[0][step]), "ranks disagree"
    for shm in shms:
        assert not shm.path.exists(), "the segment must be unlinked once mapped"
        shm.close()


def test_a_missing_peer_is_an_error_within_the_timeout():
    groups = gloo_groups(2, timeout_s=30)
    shms = on_every_rank(lambda r: ShmGroup.over(groups[r], capacity=1024, timeout_s=1.0), 2)
    started = time.monotonic()
    with pytest.raises(TPJoinError, match="shm rank 0: a peer did not reach phase 1 within 1.0 s"):
        shms[0].all_reduce(torch.ones(4))
    assert time.monotonic() - started < 5


def test_abort_stops_a_waiting_rank_at_once():
    """A peer known lost (its shard's step stream broke) ends the wait now, not after timeout_s."""
    groups = gloo_groups(2, timeout_s=30)
    shms = on_every_rank(lambda r: ShmGroup.over(groups[r], capacity=1024, timeout_s=120), 2)
    timer = threading.Timer(0.3, shms[0].abort, ["shard 1's step stream ended"])
    timer.start()
    started = time.monotonic()
    with pytest.raises(TPJoinError, match="phase 1 aborted: shard 1's step stream ended"):
        shms[0].all_reduce(torch.ones(4))
    assert time.monotonic() - started < 10  # not 120 s (10: a loaded machine)
