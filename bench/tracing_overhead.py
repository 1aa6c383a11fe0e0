"""Cost of observability on decode throughput: tracing off and on against a bare baseline.

    .venv/bin/python bench/tracing_overhead.py                 # the "small" Mixtral (bench/harness.py)
    .venv/bin/python bench/tracing_overhead.py --shape default # the issue's shape (slower)

One in-process mesh (2 stages, 2 expert servers, every service a real grpc.aio server on
loopback: shardmesh.local_mesh), batch B greedy decoding, in four modes that alternate round by
round, in rotating order (the median and the best of the rounds are reported; on a loaded
machine the best is the least disturbed figure):
  bare  every telemetry hook (metrics and tracing) replaced by a do-nothing stub: the baseline;
  off   the code as shipped, tracing off (metrics are always recorded);
  on    tracing on, every request traced, every span exported over OTLP/gRPC to a receiver in
        another process;
  sampled  the same with --sample-ratio (default 0.1) of requests traced (by trace id).
Also counts the spans per decode step and times the tracing hooks while off (ns per call).
Prints decode tokens/s (wall, and per CPU second of this process: the mesh, the client and the
span exporter) and the ratios off/bare, on/bare and sampled/bare (goals: >= 0.98, >= 0.90).
"""

import argparse
import asyncio
import collections
import json
import contextlib
import signal
import statistics
import subprocess
import sys
import time
import pathlib
import timeit

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # the OTLP receiver

import harness
from otlp_receiver import OtlpReceiver

from shardmesh.client import AsyncClient
from shardmesh.local_mesh import start_local_mesh
from shardmesh.telemetry import metrics, requests, tracing
from shardmesh.topology import ExpertServerSpec, StageSpec, Topology


class _Stub:
    """Absorbs any attribute, call or `with`: what a hook costs when it does nothing at all."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __bool__(self):
        return False


@contextlib.contextmanager
def bare():
    stub = _Stub()
    saved = []
    patches = [(tracing, n, stub) for n in ("span", "server_span", "router_step", "start_request")]
    patches += [(tracing, "current_traceparent", lambda: ""),
                (metrics, "data_plane_call", stub), (metrics, "tensor_bytes", lambda payload: 0),
                (metrics, "BATCH_SEQUENCES", stub), (metrics, "BATCH_TOKENS", stub),
                (requests.RequestTelemetry, "__init__", lambda self, *a: None),
                (requests.RequestTelemetry, "token", lambda self: None),
                (requests.RequestTelemetry, "finish", lambda self, outcome: None)]
    for owner, name, value in patches:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


async def decode_tokens_per_s(address: str, batch: int, prompt_len: int, new_tokens: int,
                              vocab: int) -> tuple[float, float]:
    """Decode rate of `batch` concurrent greedy sequences: tokens after each one's first, over
    (wall seconds, this process's CPU seconds: every service, the client and the span exporter)
    from the last first token to the last token. The CPU figure is what other load on the
    machine disturbs least."""
    firsts, lasts, cpu = [], [], []
    async with AsyncClient(address, timeout=600) as client:
        async def one(i: int):
            prompt = [1 + (i * 7 + j * 13) % (vocab - 1) for j in range(prompt_len)]
            count = 0
            async for _ in client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True):
                count += 1
                if count == 1:
                    firsts.append(time.perf_counter())
                    if len(firsts) == batch:
                        cpu.append(time.process_time())
            lasts.append(time.perf_counter())

        await asyncio.gather(*(one(i) for i in range(batch)))
        cpu.append(time.process_time())
    tokens = batch * (new_tokens - 1)
    return tokens / (max(lasts) - max(firsts)), tokens / (cpu[1] - cpu[0])


def hook_cost_ns() -> dict[str, float]:
    """ns per call of the hooks that run per step or per layer, with tracing off."""
    assert not tracing.enabled()
    number = 200_000
    return {"tracing.span (per MoE layer)": timeit.timeit(lambda: tracing.span("moe.dispatch", layer=0).__enter__(),
                                                          number=number) / number * 1e9,
            "tracing.current_traceparent": timeit.timeit(tracing.current_traceparent, number=number) / number * 1e9,
            "tracing.router_step": timeit.timeit(lambda: tracing.router_step([1, 2, 3]), number=number) / number * 1e9}


def span_cost_us() -> float:
    """CPU microseconds per span with tracing on, of a stage step's shape (a server span holding
    four child spans), its export encoded to OTLP protobuf included: the machine's load disturbs
    this much less than the end-to-end rates."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Encoding(SpanExporter):
        def export(self, spans):
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    tracing.configure("unused:1", "bench-spans", exporter=Encoding())
    parent = f"00-{'1' * 32}-{'2' * 16}-01"
    steps = 1000  # 5000 spans: within the export queue (tracing.QUEUE_SPANS), none dropped
    started = time.process_time()
    for _ in range(steps):
        with tracing.server_span("stage.step", parent, "stage-0"):
            for layer in range(2):
                with tracing.span("moe.dispatch", layer=layer):
                    tracing.current_traceparent()
                with tracing.span("moe.combine", layer=layer):
                    pass
    tracing.shutdown()  # the export thread's encoding ends here, inside the measured CPU time
    return (time.process_time() - started) / (steps * 5) * 1e6


async def sink() -> None:
    """The OTLP receiver process: prints its port, and the spans received once told to stop."""
    receiver = await OtlpReceiver().start()
    print(receiver.port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await receiver.stop()
    print(json.dumps(collections.Counter(s.service for s in receiver.spans)), flush=True)


async def main(args) -> None:
    model_dir = harness.checkpoint(args.shape)
    config = harness.SHAPES[args.shape]
    layers, experts = config["num_hidden_layers"], config["num_local_experts"]
    half = layers // 2
    topology = Topology((StageSpec("stage-0", 0, half), StageSpec("stage-1", half, layers)),
                        tuple(ExpertServerSpec(f"experts-{k}", tuple((l, e) for l in range(layers)
                                                                     for e in range(experts) if e % 2 == k))
                              for k in range(2)))
    receiver = subprocess.Popen([sys.executable, __file__, "--sink"], stdout=subprocess.PIPE, text=True)
    endpoint = f"127.0.0.1:{int(receiver.stdout.readline())}"
    mesh = await start_local_mesh(model_dir, topology)
    torch.set_num_threads(args.threads)  # 1 (default): no spinning OpenMP threads inflating CPU time
    modes = ["bare", "off", "on", "sampled"]
    rates: dict[str, list[float]] = {mode: [] for mode in modes}      # decode tok/s (wall)
    cpu_rates: dict[str, list[float]] = {mode: [] for mode in modes}  # decode tok per CPU second
    traced_steps = {"on": 0, "sampled": 0}  # pipeline steps run with tracing on
    try:
        run = lambda: decode_tokens_per_s(mesh.address, args.batch, args.prompt_len, args.new_tokens,
                                          config["vocab_size"])
        await run()  # warm-up
        for round_index in range(args.rounds):
            shift = round_index % len(modes)
            for mode in modes[shift:] + modes[:shift]:  # rotate: no mode always first
                if mode in ("on", "sampled"):
                    tracing.configure(endpoint, f"bench-{mode}", sample_ratio=args.sample_ratio if mode == "sampled" else 1.0)
                    steps_before = mesh.router.state.scheduler.steps
                with bare() if mode == "bare" else contextlib.nullcontext():
                    wall, cpu = await run()
                    rates[mode].append(wall)
                    cpu_rates[mode].append(cpu)
                if mode in ("on", "sampled"):
                    await asyncio.to_thread(tracing.shutdown)  # flush (not timed)
                    traced_steps[mode] += mesh.router.state.scheduler.steps - steps_before
        costs = hook_cost_ns()
        per_span_us = span_cost_us()
        bare_step_us = 1e6 * args.batch / statistics.median(cpu_rates["bare"])  # CPU per step, bare
    finally:
        await mesh.stop()
        receiver.terminate()  # the receiver we started, by its handle
        spans = json.loads(receiver.communicate(timeout=30)[0].split("\n")[-2])  # service -> spans received
    spans_per_step = {mode: spans.get(f"bench-{mode}", 0) / max(1, steps) for mode, steps in traced_steps.items()}
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    bests = {mode: max(values) for mode, values in rates.items()}
    cpu_medians = {mode: statistics.median(values) for mode, values in cpu_rates.items()}
    print(f"shape {args.shape}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds, {args.threads} torch thread(s); mesh: 2 stages + 2 expert servers in one process")
    for mode in modes:
        print(f"  {mode:7s} median {medians[mode]:7.1f} decode tok/s (x bare {medians[mode] / medians['bare']:.3f})"
              f"   best {bests[mode]:7.1f} (x bare {bests[mode] / bests['bare']:.3f})   worst {min(rates[mode]):7.1f}")
    for mode in modes:
        cpu_best = max(cpu_rates[mode])
        print(f"  {mode:7s} median {cpu_medians[mode]:7.1f} decode tok per CPU second "
              f"(x bare {cpu_medians[mode] / cpu_medians['bare']:.3f})   best {cpu_best:7.1f} "
              f"(x bare {cpu_best / max(cpu_rates['bare']):.3f})")
    print(f"  spans exported per pipeline step: on {spans_per_step['on']:.1f}, "
          f"sampled ({args.sample_ratio} of requests) {spans_per_step['sampled']:.1f}")
    print(f"  on: {per_span_us:.1f} CPU us per span (created, ended, encoded for export); x "
          f"{spans_per_step['on']:.1f} spans per step = {per_span_us * spans_per_step['on'] / bare_step_us:.1%} of a "
          f"bare step's {bare_step_us:.0f} CPU us (all requests traced)")
    for hook, ns in costs.items():
        print(f"  off: {hook}: {ns:.0f} ns per call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=sorted(harness.SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--sample-ratio", type=float, default=0.1, help="of requests, in the `sampled` mode")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)  # the receiver process
    arguments = parser.parse_args()
    asyncio.run(sink() if arguments.sink else main(arguments))
