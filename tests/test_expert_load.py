"""ExpertLoadMeter (tokens and busy time per window, drains) and ExpertShard add/remove."""

import asyncio

import pytest
import torch

from shardmesh.checkpoint import CheckpointReader
from shardmesh.config import ModelConfig
from shardmesh.errors import NotFound

from expert_server.load import MAX_WINDOW_S, ExpertLoadMeter


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def compute(meter: ExpertLoadMeter, clock: FakeClock, groups, seconds: float) -> None:
    with meter.computing(groups):
        clock.now += seconds


def test_windows_count_recent_tokens_and_busy_time():
    clock = FakeClock()
    meter = ExpertLoadMeter(clock)
    compute(meter, clock, [(0, 1, 5), (1, 2, 3)], 0.25)
    clock.now += 100
    compute(meter, clock, [(0, 1, 7)], 0.5)
    tokens, busy, covered = meter.report(10)
    assert tokens == {(0, 1): 7} and busy == pytest.approx(0.5) and covered == 10
    tokens, busy, covered = meter.report(200)
    assert tokens == {(0, 1): 12, (1, 2): 3} and busy == pytest.approx(0.75)
    assert covered == pytest.approx(100.75)  # younger than the window: what it has
    assert meter.report(0)[:2] == ({(0, 1): 12, (1, 2): 3}, pytest.approx(0.75))  # since start
    clock.now += MAX_WINDOW_S + 5  # old buckets are forgotten; totals are not
    assert meter.report(MAX_WINDOW_S)[:2] == ({}, 0.0)
    assert meter.report(0)[0] == {(0, 1): 12, (1, 2): 3}
    assert len(meter._buckets) <= 2


def test_a_failed_compute_counts_no_tokens_and_releases_its_experts():
    clock = FakeClock()
    meter = ExpertLoadMeter(clock)
    with pytest.raises(RuntimeError):
        with meter.computing([(0, 1, 5)]):
            assert meter.in_use([(0, 1), (0, 2)]) == [(0, 1)]
            raise RuntimeError("boom")
    assert meter.report(0)[0] == {} and meter.in_use([(0, 1)]) == []


def test_runs_recorded_soon_count_each_expert_and_reports_see_them_at_once():
    clock = FakeClock()
    meter = ExpertLoadMeter(clock, record_delay_s=0.0)  # (recorded at the loop's next turn)
    meter.record_soon(2, (4, 7), [3, 1], 1000.0, 1000.5)  # no event loop: recorded now
    assert meter.report(0)[:2] == ({(2, 4): 3, (2, 7): 1}, pytest.approx(0.5))

    async def main():
        with meter.computing([(2, 7, 2)]):
            meter.record_soon(2, (4, 7), [1, 1], 1000.5, 1000.75)
            assert meter.in_use([(2, 4), (2, 7)]) == [(2, 7)]  # (computed without yielding: never in use)
            before_the_loop_turns = dict(meter.total_tokens)
            assert meter.report(10)[0] == {(2, 4): 4, (2, 7): 2}  # a report counts it at once
        await asyncio.sleep(0)
        return before_the_loop_turns

    assert asyncio.run(main()) == {(2, 4): 3, (2, 7): 1}
    tokens, busy, _ = meter.report(10)
    assert tokens == {(2, 4): 4, (2, 7): 4} and busy == pytest.approx(0.75)
    assert dict(meter.total_tokens) == tokens


def test_runs_recorded_soon_are_recorded_together_after_the_delay():
    clock = FakeClock()
    meter = ExpertLoadMeter(clock, record_delay_s=0.05)

    async def main():
        meter.record_soon(1, (0, 3), [2, 1], 1000.0, 1000.25)
        await asyncio.sleep(0)
        meter.record_soon(1, (3,), [5], 1000.25, 1000.5)
        await asyncio.sleep(0)
        not_yet = dict(meter.total_tokens), meter.total_busy_s  # not one callback per call
        await asyncio.sleep(0.2)
        return not_yet

    assert asyncio.run(main()) == ({}, 0.0)
    assert dict(meter.total_tokens) == {(1, 0): 2, (1, 3): 6}  # the loop recorded both
    assert meter.total_busy_s == pytest.approx(0.5) and not meter._pending


def test_drained_waits_for_calls_using_the_experts():
    async def main():
        meter = ExpertLoadMeter()
        release = asyncio.Event()

        async def call(groups):
            with meter.computing(groups):
                await release.wait()

        task = asyncio.create_task(call([(0, 1, 4), (0, 2, 1)]))
        await asyncio.sleep(0)
        assert await meter.drained([(0, 3)], timeout=1) == []          # not in use: at once
        assert await meter.drained([(0, 1)], timeout=0.05) == [(0, 1)]  # in use: times out
        waiting = asyncio.create_task(meter.drained([(0, 1), (0, 2)], timeout=5))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        release.set()
        await task
        assert await waiting == []

    asyncio.run(main())


def test_shard_adds_reading_only_new_experts_and_removes(mixtral_dir):
    from shardmesh.expert_model import ExpertShard

    config = ModelConfig.from_dir(mixtral_dir)
    reader = CheckpointReader(mixtral_dir)
    shard = ExpertShard(config, [], reader)
    assert shard.experts == [] and reader.tensors_read == []
    assert shard.add([(1, 3), (0, 2)], reader) == [(0, 2), (1, 3)]
    assert sorted(reader.tensors_read) == sorted(
        f"model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight" for l, e in [(0, 2), (1, 3)] for w in ("w1", "w2", "w3"))
    assert shard.add([(0, 2)], reader) == [] and len(reader.tensors_read) == 6  # held: not read again
    x = torch.randn(3, config.hidden_size)  # [n, H]
    reference = ExpertShard(config, [(0, 2)], CheckpointReader(mixtral_dir)).compute(0, 2, x)
    torch.testing.assert_close(shard.compute(0, 2, x), reference, rtol=0, atol=0)
    with pytest.raises(NotFound, match="layer 0, expert 5"):
        shard.remove([(0, 2), (0, 5)])
    assert shard.experts == [(0, 2), (1, 3)]  # nothing removed on a bad request
    shard.remove([(0, 2)])
    assert shard.experts == [(1, 3)] and not shard.holds(0, 2)
    with pytest.raises(NotFound):
        shard.compute(0, 2, x)
    with pytest.raises(ValueError, match="outside"):
        shard.add([(9, 0)], reader)
