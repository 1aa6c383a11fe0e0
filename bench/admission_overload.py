"""Admission under overload: do admitted requests keep their throughput while a flood of requests
past the router's bound is refused?

    .venv/bin/python bench/admission_overload.py [--batch 4] [--new-tokens 64] [--flooders 8] [--repeats 3]
                                                 [--flood-rate 0]

A mesh of real processes (`Launcher`, the small seeded Mixtral) whose router admits `--batch`
running sequences and queues none (`--max-batch-sequences B --max-queued 0`). Each round runs B
concurrent greedy generations and measures their decode tokens/s (tokens after each stream's
first / time from the last first token to the last token), alone (baseline) and while a separate
flood process (`--flooders` concurrent loops calling Generate without backoff, each refused with
RESOURCE_EXHAUSTED) hammers the router. Prints the median of each, the ratio (goal >= 0.90), the
refusals per second and their latency, and checks that every admitted generation got the same
tokens in both runs.

What it measures, honestly: on a 2-core machine the flood process, the client and every service
share the same cores, so an unlimited flood (`--flood-rate 0`) mostly measures how much CPU the
flooder itself takes from the mesh. `--flood-rate R` caps the flood at R requests/s (spread over
the flooders), so the ratio shows what refusing R requests/s costs the server; the router's CPU
per refusal and the flooder's CPU are printed either way, with the router's peak memory.
"""

import argparse
import asyncio
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time

import harness

from shardmesh.client import AsyncClient, ResourceExhaustedError
from shardmesh.launcher import Launcher

PROMPTS = [[1, 5 + i, 9 + 2 * i, 27] for i in range(64)]
TICKS = os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of process `pid`, KiB."""
    lines = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: int(value.split()[0]) for key, _, value in (line.partition(":") for line in lines)
            if key in ("VmRSS", "VmHWM")}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def admitted_round(address: str, token: str, batch: int, new_tokens: int, started=None):
    """B concurrent generations; returns (decode tokens/s over the window all are decoding, tokens)."""
    firsts, lasts, outputs = [], [], []
    async with AsyncClient(address, timeout=600, token=token) as client:
        async def one(prompt):
            tokens = []
            async for token in client.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True):
                if not tokens:
                    firsts.append(time.perf_counter())
                tokens.append(token.token_id)
            lasts.append(time.perf_counter())
            outputs.append(tokens)

        tasks = [asyncio.create_task(one(p)) for p in PROMPTS[:batch]]
        while len(firsts) < batch:
            await asyncio.sleep(0.001)
        if started is not None:
            started()
        await asyncio.gather(*tasks)
    window = max(lasts) - max(firsts)
    decoded = sum(len(t) - 1 for t in outputs)
    return decoded / window, sorted(outputs)


async def flood(address: str, token: str, flooders: int, rate: float) -> None:
    """After a line on stdin, loop Generate without backoff until the next line (or EOF); then print
    `refused accepted seconds latency...`."""
    stop = threading.Event()
    sys.stdin.readline()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    refused, accepted, latencies = 0, 0, []
    async with AsyncClient(address, timeout=30, token=token) as client:
        interval = flooders / rate if rate else 0.0  # each loop's period at the capped rate

        async def loop():
            nonlocal refused, accepted
            next_at = time.perf_counter()
            while not stop.is_set():
                if interval:
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                start = time.perf_counter()
                try:
                    await client.generate_all([1, 2, 3], max_new_tokens=1)
                    accepted += 1
                except ResourceExhaustedError:
                    refused += 1
                    latencies.append(time.perf_counter() - start)
        flood_start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(flooders)))
        elapsed = time.perf_counter() - flood_start
    print(refused, accepted, f"{elapsed:.3f}", *(f"{x:.6f}" for x in latencies), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--flooders", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flood-rate", type=float, default=0.0, metavar="R",
                        help="cap the flood at R requests/s (0 = as fast as the flooders go)")
    parser.add_argument("--flood", nargs=2, metavar=("ADDRESS", "TOKEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        asyncio.run(flood(args.flood[0], args.flood[1], args.flooders, args.flood_rate))
        return 0
    model_dir = harness.checkpoint("small")
    router_args = ["--max-batch-sequences", str(args.batch), "--max-queued", "0"]
    with Launcher(model_dir, service_args={"router": router_args}) as launcher:
        address, token = launcher.router_address, launcher.client_token
        asyncio.run(admitted_round(address, token, args.batch, 8))  # warm up
        alone, loaded, refusals, router_cpu, flooder_cpu, flood_seconds = [], [], [], [], [], []
        router_pid = launcher.processes["router"].pid
        memory_before = memory_kib(router_pid)
        same = True
        for _ in range(args.repeats):
            cpu = cpu_seconds(router_pid)
            rate, reference = asyncio.run(admitted_round(address, token, args.batch, args.new_tokens))
            alone.append(rate)
            cpu_alone = cpu_seconds(router_pid) - cpu
            # Started now, flooding once every admitted stream has its first token (so no flood
            # request can take a batch slot): one line on its stdin says go, the next says stop.
            flooder = subprocess.Popen([sys.executable, __file__, "--flooders", str(args.flooders), "--flood-rate",
                                        str(args.flood_rate), "--flood", address, token],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            time.sleep(2.0)  # it imports grpc meanwhile

            def go():
                flooder.stdin.write("go\n")
                flooder.stdin.flush()

            cpu, flooder_start = cpu_seconds(router_pid), cpu_seconds(flooder.pid)
            started = time.perf_counter()
            rate, outputs = asyncio.run(admitted_round(address, token, args.batch, args.new_tokens, go))
            router_cpu.append((cpu_alone, cpu_seconds(router_pid) - cpu))
            flooder_cpu.append((cpu_seconds(flooder.pid) - flooder_start) / (time.perf_counter() - started))
            loaded.append(rate)
            same &= outputs == reference
            out, _ = flooder.communicate("stop\n", timeout=60)
            if out.strip():
                refused, accepted, elapsed, *latencies = out.split()
                refusals.append((int(refused), int(accepted), [float(x) for x in latencies]))
                flood_seconds.append(float(elapsed))
        memory_after = memory_kib(router_pid)
    base, under = statistics.median(alone), statistics.median(loaded)
    print(f"batch {args.batch}, {args.new_tokens} new tokens, {args.flooders} flooders, {args.repeats} rounds, "
          f"flood rate {'unlimited' if not args.flood_rate else f'capped at {args.flood_rate:g}/s'}")
    print(f"  admitted decode tok/s alone      : {base:8.1f}  (rounds: {', '.join(f'{r:.1f}' for r in alone)})")
    print(f"  admitted decode tok/s under flood: {under:8.1f}  (rounds: {', '.join(f'{r:.1f}' for r in loaded)})")
    print(f"  ratio under flood / alone        : {under / base:8.3f}  (goal >= 0.90)")
    latencies = sorted(x for _, _, lat in refusals for x in lat)
    if latencies:
        print(f"  refusals: {sum(r for r, _, _ in refusals)} RESOURCE_EXHAUSTED "
              f"({sum(r for r, _, _ in refusals) / max(sum(flood_seconds), 1e-9):.0f}/s while flooding), "
              f"{sum(a for _, a, _ in refusals)} admitted; latency p50 {1e3 * latencies[len(latencies) // 2]:.2f} ms, "
              f"p99 {1e3 * latencies[int(len(latencies) * 0.99)]:.2f} ms")
    refused_total = sum(r for r, _, _ in refusals)
    extra_cpu = sum(loaded_cpu - alone_cpu for alone_cpu, loaded_cpu in router_cpu)
    print(f"  router CPU s per round alone / under flood: "
          f"{', '.join(f'{a:.2f}/{b:.2f}' for a, b in router_cpu)}; extra per refusal "
          f"{1e6 * extra_cpu / max(refused_total, 1):.0f} us")
    print(f"  flood process CPU: {', '.join(f'{c:.2f}' for c in flooder_cpu)} cores during the flooded rounds")
    print(f"  router memory (KiB): VmRSS {memory_before['VmRSS']} -> {memory_after['VmRSS']}, "
          f"peak VmHWM {memory_before['VmHWM']} -> {memory_after['VmHWM']}")
    print(f"  machine: {os.cpu_count()} CPUs shared by the flood process, the client and every service")
    print(f"  same tokens alone and under flood: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
