"""The process's compute threads: same results in the same order as a plain loop, errors raised
to the caller, workers with torch's thread count of the process (not an OpenMP team each)."""

import threading

import pytest
import torch
import torch.nn.functional as F

from shardmesh import compute_pool, kernels
from shardmesh.errors import NotFound
from shardmesh.models.matmul import linear


@pytest.fixture
def pool():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    compute_pool.set_threads(3)
    yield compute_pool
    compute_pool.set_threads(1)
    torch.set_num_threads(threads)


def test_map_keeps_order_and_runs_the_parts_at_once(pool):
    barrier = threading.Barrier(3, timeout=10)  # passes only if three items run at the same time
    counts = []

    def work(i: int) -> int:
        if i < 3:
            barrier.wait()
        counts.append(torch.get_num_threads())
        return i * i

    assert pool.parallel_map(work, list(range(10))) == [i * i for i in range(10)]
    assert set(counts) == {1}  # workers inherit torch's thread count of the process


def test_errors_reach_the_caller(pool):
    def work(i: int) -> int:
        if i == 4:
            raise NotFound("expert", "(layer 0, expert 4) is not held here")
        return i

    with pytest.raises(NotFound):
        pool.parallel_map(work, list(range(6)))


def test_parallel_linear_matches_linear(pool):
    inputs, weight = torch.randn(5, 64), torch.randn(3000, 64)
    assert torch.allclose(pool.parallel_linear(inputs, weight), F.linear(inputs, weight), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("threads", [2, 3])
def test_parallel_linear_is_bit_identical_in_the_kernels_rows(rows, threads):
    """The LM head split over the pool (odd slice boundaries at 3 threads): each output is the unsplit
    product's bits, in the C kernels' row range (1-64)."""
    assert kernels.kernel() is not None, "the CPU kernels did not build here (see the log): CI has gcc"
    compute_pool.set_threads(threads)
    try:
        generator = torch.Generator().manual_seed(rows)
        inputs, weight = torch.randn(rows, 96, generator=generator), torch.randn(3001, 96, generator=generator)
        assert torch.equal(compute_pool.parallel_linear(inputs, weight), linear(inputs, weight))
    finally:
        compute_pool.set_threads(1)


def test_bad_size_is_refused():
    with pytest.raises(ValueError):
        compute_pool.set_threads(0)
