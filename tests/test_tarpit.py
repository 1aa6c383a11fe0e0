"""The tarpit (router/tarpit.py): a caller refused faster than `refusals_per_second` gets its
further refusals late, so a closed-loop flood slows down; other callers' refusals stay immediate;
the held calls are bounded; an admitted request keeps giving the right tokens. Over the real wire,
callers told apart by their named client token (`--caller-identity token`)."""

import asyncio
import time

import grpc
import pytest

from shardmesh.client_tokens import ClientTokens
from shardmesh.reference import transformers_greedy
from shardmesh.security import Security
from shardmesh.v1 import router_pb2, router_pb2_grpc

from router.tarpit import TIME_CONSTANT_S, Tarpit, TarpitConfig
from wire_helpers import ModuleMesh

TOKENS = {"alice": "alice-secret-0123456789", "mallory": "mallory-secret-0123456789"}
INTERNAL_TOKEN = "internal-secret-9876543210"
# Held at least BASE_DELAY_S each once flooding: FLOOD_LOOPS closed loops then make at most
# FLOOD_LOOPS / BASE_DELAY_S = 16 refusals/s, whatever the machine's load. The threshold is low so
# that even loops slowed by a loaded machine (load ~10) stay above it: held 0.5 s each, 4 loops
# make ~8/s > 2/s.
PIT = TarpitConfig(refusals_per_second=2, base_delay_s=0.25, max_delay_s=0.5)
FLOOD_LOOPS = 4
PROMPT, CHECKED_TOKENS = [1, 9, 27, 81], 12


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_flooding_caller_is_held_and_a_rare_one_is_not():
    clock = Clock()
    pit = Tarpit(TarpitConfig(refusals_per_second=10, base_delay_s=0.1, max_delay_s=0.5, max_callers=2), clock)
    threshold = 10 * TIME_CONSTANT_S  # score at 10 refusals/s sustained
    delays = []
    for _ in range(200):  # 1000 refusals/s for 0.2 s
        delays.append(pit.delay("flooder"))
        clock.now += 0.001
    assert delays[:int(threshold)] == [0.0] * int(threshold)  # a burst under the threshold is refused at once
    assert all(d > 0 for d in delays[int(threshold) + 1:])
    assert delays[-1] > delays[int(threshold) + 1]  # it grows while the flood persists ...
    assert max(delays) == 0.5  # ... up to max_delay_s
    assert pit.delay("rare") == 0.0  # another caller: at once
    clock.now += 10.0
    assert pit.delay("rare") == 0.0
    clock.now += 5 * TIME_CONSTANT_S  # the flooder stopped: its score decays, it is at once again
    assert pit.delay("flooder") == 0.0
    pit.delay("third")  # max_callers 2: the least recently refused ("rare") is forgotten
    assert list(pit.scores) == ["flooder", "third"]


def test_held_calls_are_bounded():
    async def body():
        pit = Tarpit(TarpitConfig(refusals_per_second=1, base_delay_s=0.2, max_delay_s=0.2, max_held=3))
        for _ in range(10):
            pit.delay("flooder")  # well over the threshold
        holds = [asyncio.create_task(pit.hold("flooder")) for _ in range(5)]
        await asyncio.sleep(0.05)
        held_now = pit.held
        seconds = await asyncio.gather(*holds)
        return held_now, seconds, pit.held

    held_now, seconds, held_after = asyncio.run(body())
    assert held_now == 3 and sorted(seconds) == [0.0, 0.0, 0.2, 0.2, 0.2] and held_after == 0


def test_one_caller_cannot_take_every_hold():
    async def body():
        pit = Tarpit(TarpitConfig(refusals_per_second=1, base_delay_s=0.2, max_delay_s=0.2, max_held=4,
                                  max_held_per_caller=2))
        for _ in range(10):
            pit.delay("flooder")
            pit.delay("other")  # both well over the threshold
        floods = [asyncio.create_task(pit.hold("flooder")) for _ in range(4)]
        await asyncio.sleep(0.05)
        others = [asyncio.create_task(pit.hold("other")) for _ in range(3)]
        await asyncio.sleep(0.05)
        held_now = dict(pit.held_by)
        return held_now, await asyncio.gather(*floods), await asyncio.gather(*others), pit.held_by

    held_now, floods, others, held_after = asyncio.run(body())
    assert held_now == {"flooder": 2, "other": 2}  # without the per-caller cap the flooder takes all 4
    assert sorted(floods) == [0.0, 0.0, 0.2, 0.2] and sorted(others) == [0.0, 0.2, 0.2] and held_after == {}


def test_config_is_validated():
    for bad in (dict(refusals_per_second=0), dict(refusals_per_second=1, base_delay_s=0),
                dict(refusals_per_second=1, base_delay_s=1, max_delay_s=0.5), dict(refusals_per_second=1, max_held=-1),
                dict(refusals_per_second=1, max_held_per_caller=-1)):
        with pytest.raises(ValueError):
            TarpitConfig(**bad)


@pytest.fixture(scope="module")
def mesh(make_model_dir):
    from conftest import VARIANTS
    model_dir = make_model_dir(**{**VARIANTS["mixtral"], "max_position_embeddings": 4096})
    security = Security(client_tokens=ClientTokens(TOKENS), internal_token=INTERNAL_TOKEN)
    running = ModuleMesh.start(model_dir, security=security, router_options=dict(
        max_batch_sequences=1, max_queued=0, caller_identity="token", tarpit=PIT))
    running.model_dir = model_dir
    yield running
    running.stop()


def request(prompt, new_tokens):
    return router_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)


async def flood(stub, seconds: float, metadata) -> list[tuple[float, float, dict]]:
    """FLOOD_LOOPS closed loops of Generate for `seconds`; each refusal's (start, duration, trailing metadata)."""
    refusals, end = [], time.monotonic() + seconds

    async def loop():
        while time.monotonic() < end:
            start = time.monotonic()
            call = stub.Generate(request([1, 2, 3], 1), timeout=10, metadata=metadata)
            try:
                async for _ in call:
                    pass
                raise AssertionError("admitted while the batch slot is taken")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                refusals.append((start, time.monotonic() - start, dict(error.trailing_metadata() or ())))

    await asyncio.gather(*(loop() for _ in range(FLOOD_LOOPS)))
    return refusals


def test_a_flood_is_slowed_and_others_are_refused_at_once(mesh):
    router = mesh.mesh.router.state
    alice, mallory = (("authorization", f"Bearer {TOKENS['alice']}"),), (("authorization", f"Bearer {TOKENS['mallory']}"),)

    async def body():
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            admitted = stub.Generate(request(PROMPT, 4000 - len(PROMPT)), timeout=120, metadata=alice)
            tokens = [(await admitted.read()).token_id]  # the only batch slot is taken
            router.tarpit = None
            untrapped = await flood(stub, 1.0, mallory)
            router.tarpit = pit = Tarpit(PIT)
            trapped = await flood(stub, 3.0, mallory)
            start, held_before_other = time.monotonic(), pit.held_total
            try:
                await stub.Generate(request([1, 2, 3], 1), timeout=10, metadata=alice).read()
            except grpc.aio.AioRpcError as error:
                other = (error.code(), error.details(), dict(error.trailing_metadata() or ()), time.monotonic() - start)
            while len(tokens) < CHECKED_TOKENS:
                tokens.append((await admitted.read()).token_id)
            admitted.cancel()
            return untrapped, trapped, other, held_before_other, pit, tokens

    untrapped, trapped, other, held_before_other, pit, tokens = mesh.run(body())
    scraped = metric_values()  # what Prometheus would read now, the flood's tarpit still in place
    router.tarpit = Tarpit(PIT)  # as started
    assert scraped["shardmesh_tarpit_held_refusals_total"] == pit.held_total >= len(trapped) - 2 * FLOOD_LOOPS
    assert scraped["shardmesh_tarpit_refusals_total"] == pit.refusals_total >= len(trapped) + 1
    assert scraped["shardmesh_tarpit_held_calls"] == 0  # the loops ended
    assert scraped["shardmesh_tarpit_flooding_callers"] == 1  # mallory, seconds ago; alice was refused once
    rate_off = len(untrapped) / 1.0
    # Once flooding (after the first second), every refusal was held, and said so.
    settled = [r for r in trapped if r[0] >= trapped[0][0] + 1.0]
    assert settled and all(duration >= PIT.base_delay_s for _, duration, _ in settled), settled[:5]
    assert all(int(meta["grpc-retry-pushback-ms"]) >= 250 and meta["retry-after"] == "1" for _, _, meta in settled)
    rate_on = len(settled) / 2.0
    assert rate_on <= FLOOD_LOOPS / PIT.base_delay_s + 1, rate_on  # the closed loops' ceiling
    # The flood's rate drops at least 4x: unheld refusals in-process take a few ms even at load ~10
    # (4 loops: hundreds/s), held ones >= 0.25 s each (4 loops: <= 16/s).
    assert rate_off >= 4 * rate_on, (rate_off, rate_on)
    print(f"flood refusals/s: {rate_off:.0f} without the tarpit, {rate_on:.1f} held by it")
    # Another caller (token alice) is refused at once, without a hold or backoff metadata.
    code, details, metadata, _ = other
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "back off" not in details and "retry-after" not in metadata
    assert pit.held_total == held_before_other and set(pit.scores) == {"token:mallory", "token:alice"}
    # The admitted request went on through the flood with transformers' tokens.
    assert tokens == transformers_greedy(mesh.model_dir, PROMPT, CHECKED_TOKENS, ignore_eos=True)


def metric_values() -> dict[str, float]:
    """The router's tarpit series in this process's metrics, as scraped: name -> value."""
    from prometheus_client import generate_latest

    from shardmesh.telemetry import metrics

    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in generate_latest(metrics.REGISTRY).decode().splitlines()
            if line.startswith("shardmesh_tarpit_") and 'server="router"' in line}


def test_the_router_command_line_takes_the_tarpit():
    import argparse

    from shardmesh.serve import add_service_arguments
    parser = argparse.ArgumentParser()
    add_service_arguments(parser, "router")
    args = parser.parse_args(["--model", "m", "--tarpit-refusals-per-second", "20", "--caller-identity", "token"])
    assert args.tarpit_refusals_per_second == 20.0 and args.caller_identity == "token"
    # On by default: a client retrying without backoff (~600 refusals/s here) is held, a client that
    # backs off is not (bench/admission_overload.py: flood/alone 0.725 without, 0.958 with it at 20/s).
    assert parser.parse_args(["--model", "m"]).tarpit_refusals_per_second == 50.0
    assert parser.parse_args(["--model", "m", "--tarpit-refusals-per-second", "0"]).tarpit_refusals_per_second == 0
