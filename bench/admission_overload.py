"""Admission under overload: do admitted requests keep their throughput while a flood of requests
past the router's bound is refused?

    .venv/bin/python bench/admission_overload.py [--batch 4] [--new-tokens 256] [--flooders 8] [--repeats 3]
                                                 [--flood-rate R] [--pin MESH_CPUS:FLOOD_CPUS] [--tarpit R]

A mesh of real processes (`Launcher`, the small seeded Mixtral) whose router admits `--batch`
running sequences and queues none (`--max-batch-sequences B --max-queued 0`). The admitted load is
B concurrent greedy generations; its figure is their decode tokens/s (tokens after each stream's
first / time from the last first token to the last token). Each repeat runs three rounds in turn:

  alone   the admitted load and nothing else of ours;
  flood   the same while a flood process (`--flooders` loops calling Generate without backoff, or
          `--flood-rate R` requests/s in all) is refused RESOURCE_EXHAUSTED by the router; it starts
          once every admitted stream has its first token, so no flood request takes a batch slot;
  burner  the same while a process burns, on the flood's CPUs, the CPU time the flood process
          used in this repeat's flood round (a duty-cycled busy loop, not one call): what the
          flood costs through the CPU its own client takes.

Printed (medians over repeats): flood/alone, the issue's figure (goal >= 0.90); flood/burner, the
flood's cost with its client's CPU accounted for, i.e. what refusing costs the server side;
burner/alone; refusals/s and their latency; the router's CPU per refusal and its share of a core
spent refusing; the flood process's CPU; the router's peak memory; same tokens in every round.

`--pin 0:1` runs the mesh and the admitted client on CPU 0 and the flood (and the burner) on CPU 1
(sched_setaffinity; services inherit it), in every round: a flood from another machine, as in a
deployment, with the server side's CPU its own. Without it every process shares every CPU.

`--tarpit R` starts a second, identical mesh whose router holds the refusals of callers refused
faster than R/s (router/tarpit.py); each repeat then also runs alone+tarpit and flood+tarpit on it
(each mesh idle while the other is measured), and prints flood+tarpit / alone+tarpit.
"""

import argparse
import asyncio
import contextlib
import math
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
BURN_PERIOD_S = 0.01


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of process `pid`, KiB."""
    lines = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: int(value.split()[0]) for key, _, value in (line.partition(":") for line in lines)
            if key in ("VmRSS", "VmHWM")}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpus(text: str) -> set[int]:
    """"0", "0,1", "2-3" -> CPU numbers."""
    out = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


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
    refused, accepted, latencies = 0, 0, []
    async with AsyncClient(address, timeout=30, token=token) as client:
        await client.model_info()  # connected before the flood starts
        sys.stdin.readline()
        threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
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


def burn(fraction: float) -> None:
    """Use `fraction` of one CPU (by this process's CPU time) until stdin closes."""
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        period_end = time.perf_counter() + BURN_PERIOD_S
        target = time.process_time() + fraction * BURN_PERIOD_S
        while time.process_time() < target and time.perf_counter() < period_end:
            pass
        time.sleep(max(0.0, period_end - time.perf_counter()))


def helper(args: argparse.Namespace, flood_cpus: set[int] | None, *extra: str) -> subprocess.Popen:
    pin = ["--pin-self", ",".join(map(str, sorted(flood_cpus)))] if flood_cpus else []
    return subprocess.Popen([sys.executable, __file__, *pin, *extra], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--flooders", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flood-rate", type=float, default=0.0, metavar="R",
                        help="cap the flood at R requests/s (0 = as fast as the flooders go)")
    parser.add_argument("--tarpit", type=float, default=0.0, metavar="R",
                        help="also measure, in the same run, a second mesh whose router has "
                             "--tarpit-refusals-per-second R (router/tarpit.py): rounds alone+tarpit, flood+tarpit")
    parser.add_argument("--pin", default="", metavar="MESH_CPUS:FLOOD_CPUS",
                        help="e.g. 0:1: the mesh and the admitted client on CPU 0, the flood and burner on CPU 1")
    parser.add_argument("--flood", nargs=2, metavar=("ADDRESS", "TOKEN"), help=argparse.SUPPRESS)
    parser.add_argument("--burn", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--pin-self", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pin_self:
        os.sched_setaffinity(0, cpus(args.pin_self))  # before grpc starts its threads
    if args.flood:
        asyncio.run(flood(args.flood[0], args.flood[1], args.flooders, args.flood_rate))
        return 0
    if args.burn is not None:
        burn(args.burn)
        return 0
    mesh_cpus = flood_cpus = None
    if args.pin:
        mesh_text, _, flood_text = args.pin.partition(":")
        mesh_cpus, flood_cpus = cpus(mesh_text), cpus(flood_text)
        os.sched_setaffinity(0, mesh_cpus)  # every service inherits it
    model_dir = harness.checkpoint("small")
    router_args = ["--max-batch-sequences", str(args.batch), "--max-queued", "0"]
    kinds = ["alone", "flood", "burner"] + (["alone+tarpit", "flood+tarpit"] if args.tarpit else [])
    rounds = {kind: [] for kind in kinds}
    router_cpu, flooder_cpu, burner_cpu = {k: [] for k in kinds}, {k: [] for k in kinds}, []
    refusals, flood_seconds = {k: [] for k in kinds}, {k: [] for k in kinds}  # per flood kind
    with contextlib.ExitStack() as stack:
        # Without --tarpit one mesh; with it a second one whose router has the tarpit, idle while
        # the first is measured and the other way round.
        meshes = {"": stack.enter_context(Launcher(model_dir, service_args={  # the tarpit is on by default
            "router": router_args + ["--tarpit-refusals-per-second", "0"]}))}
        if args.tarpit:
            meshes["+tarpit"] = stack.enter_context(Launcher(model_dir, service_args={
                "router": router_args + ["--tarpit-refusals-per-second", str(args.tarpit)]}))
        for launcher in meshes.values():
            asyncio.run(admitted_round(launcher.router_address, launcher.client_token, args.batch, 8))  # warm up
        memory_before = {suffix: memory_kib(m.processes["router"].pid) for suffix, m in meshes.items()}
        reference, same = None, True

        def measured(kind: str, launcher, started=None):
            nonlocal reference, same
            pid = launcher.processes["router"].pid
            cpu, at = cpu_seconds(pid), time.perf_counter()
            rate, outputs = asyncio.run(admitted_round(launcher.router_address, launcher.client_token, args.batch,
                                                       args.new_tokens, started))
            router_cpu[kind].append((cpu_seconds(pid) - cpu) / (time.perf_counter() - at))  # cores
            rounds[kind].append(rate)
            reference = reference or outputs
            same &= outputs == reference

        def flooded(kind: str, launcher):
            flooder = helper(args, flood_cpus, "--flooders", str(args.flooders), "--flood-rate", str(args.flood_rate),
                             "--flood", launcher.router_address, launcher.client_token)
            time.sleep(2.0)  # it imports grpc meanwhile

            def go():
                flooder.stdin.write("go\n")
                flooder.stdin.flush()
                go.cpu, go.at = cpu_seconds(flooder.pid), time.perf_counter()

            measured(kind, launcher, go)
            flooder_cpu[kind].append((cpu_seconds(flooder.pid) - go.cpu) / (time.perf_counter() - go.at))
            out, _ = flooder.communicate("stop\n", timeout=60)
            if out.strip():
                refused, accepted, elapsed, *latencies = out.split()
                refusals[kind].append((int(refused), int(accepted), [float(x) for x in latencies]))
                flood_seconds[kind].append(float(elapsed))

        for _ in range(args.repeats):
            measured("alone", meshes[""])
            flooded("flood", meshes[""])
            # The same CPU as the flood process took, on the same CPUs, without a call.
            used = flooder_cpu["flood"][-1]
            count = max(1, math.ceil(used))
            burners = [helper(args, flood_cpus, "--burn", f"{used / count:.3f}") for _ in range(count)]
            time.sleep(0.5)
            starts, at = [cpu_seconds(b.pid) for b in burners], time.perf_counter()
            measured("burner", meshes[""])
            burner_cpu.append(sum(cpu_seconds(b.pid) - s for b, s in zip(burners, starts)) / (time.perf_counter() - at))
            for b in burners:
                b.stdin.close()
                b.wait(10)
            if args.tarpit:
                measured("alone+tarpit", meshes["+tarpit"])
                flooded("flood+tarpit", meshes["+tarpit"])
        memory_after = {suffix: memory_kib(m.processes["router"].pid) for suffix, m in meshes.items()}
    median = {kind: statistics.median(values) for kind, values in rounds.items()}
    print(f"batch {args.batch}, {args.new_tokens} new tokens, {args.flooders} flooders, {args.repeats} repeats, "
          f"flood rate {'unlimited' if not args.flood_rate else f'capped at {args.flood_rate:g}/s'}, "
          + (f"mesh + admitted client on CPUs {sorted(mesh_cpus)}, flood/burner on CPUs {sorted(flood_cpus)}"
             if args.pin else f"every process on every CPU ({os.cpu_count()})")
          + (f"; tarpit: a second mesh, --tarpit-refusals-per-second {args.tarpit:g}" if args.tarpit else ""))
    for kind in kinds:
        print(f"  admitted decode tok/s, {kind:12s}: {median[kind]:8.1f}  "
              f"(rounds: {', '.join(f'{r:.1f}' for r in rounds[kind])})")
    print(f"  flood / alone  : {median['flood'] / median['alone']:6.3f}  (the issue's figure; goal >= 0.90)")
    print(f"  flood / burner : {median['flood'] / median['burner']:6.3f}  (the flood client's CPU accounted for)")
    print(f"  burner / alone : {median['burner'] / median['alone']:6.3f}  (the flood client's CPU alone)")
    if args.tarpit:
        print(f"  tarpit: flood+tarpit / alone+tarpit {median['flood+tarpit'] / median['alone+tarpit']:6.3f}, "
              f"flood+tarpit / alone {median['flood+tarpit'] / median['alone']:6.3f} (goal >= 0.90)")
    for kind in [k for k in kinds if refusals[k]]:
        refused_total = sum(r for r, _, _ in refusals[kind])
        latencies = sorted(x for _, _, lat in refusals[kind] for x in lat)
        per_second = refused_total / max(sum(flood_seconds[kind]), 1e-9)
        print(f"  {kind}: {refused_total} RESOURCE_EXHAUSTED ({per_second:.0f}/s while flooding), "
              f"{sum(a for _, a, _ in refusals[kind])} admitted; latency p50 "
              f"{1e3 * latencies[len(latencies) // 2]:.2f} ms, p99 {1e3 * latencies[int(len(latencies) * 0.99)]:.2f} ms; "
              f"flood process CPU {', '.join(f'{c:.2f}' for c in flooder_cpu[kind])} cores")
        # The router's extra CPU under the flood (cores, flood round - alone round) per refusal/s.
        alone = "alone+tarpit" if kind == "flood+tarpit" else "alone"
        extra = statistics.median(router_cpu[kind]) - statistics.median(router_cpu[alone])
        print(f"    router CPU (cores) {alone} / {kind}: " + ", ".join(
            f"{a:.2f}/{f:.2f}" for a, f in zip(router_cpu[alone], router_cpu[kind]))
              + f"; {extra:.2f} more under the flood = {1e6 * extra / max(per_second, 1e-9):.0f} us per refusal")
    print(f"  burner CPU: {', '.join(f'{c:.2f}' for c in burner_cpu)} cores")
    for suffix in meshes:
        print(f"  router{suffix} memory (KiB): VmRSS {memory_before[suffix]['VmRSS']} -> {memory_after[suffix]['VmRSS']}, "
              f"peak VmHWM {memory_before[suffix]['VmHWM']} -> {memory_after[suffix]['VmHWM']}")
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; same tokens in every round: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
