"""Soak: concurrent streams for minutes while one expert replica is killed (SIGKILL) and restarted
every minute. Reports errors (goal 0), whether every generation's tokens equal the fault-free
run's, throughput against the fault-free run, and memory growth per service (goal under 5%).

    .venv/bin/python bench/soak.py [--minutes 10] [--kill-every 60] [--streams 16] [--new-tokens 32]

A `shardmesh up` mesh (`Launcher`, the small seeded Mixtral, default topology) plus a second
replica of the first expert server (`experts-a@soak`, as `docker compose up --scale` would add).
Phase 1 (baseline, no faults): every prompt of a pool is generated once, `--streams` at a time:
the reference tokens and tokens/s. Phase 2 (soak): `--streams` clients loop over the pool for
`--minutes`, each generation checked against its reference; every `--kill-every` s one replica
of that expert server (alternately the original and the added one) gets SIGKILL and is started
again at once (it registers again when loaded); a kill waits (and says so) until the router lists
every replica of that server as live, so that another replica of its experts always lives.
Memory: VmRSS of every service process at the start of phase 2 and at its end (a restarted
replica is a new process: reported, not judged).
"""

import argparse
import asyncio
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import sys
import time

import harness

from shardmesh.client import AsyncClient, ShardmeshError
from shardmesh.launcher import Launcher

PROMPTS = [[1, 7 + 3 * i, 11 + i, 40 + 5 * i, 3] for i in range(48)]


def rss_kib(pid: int) -> int | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


@dataclasses.dataclass
class Tally:
    generations: int = 0
    tokens: int = 0
    errors: list = dataclasses.field(default_factory=list)      # (seconds into the soak, error text)
    mismatches: list = dataclasses.field(default_factory=list)  # prompt index
    kills: list = dataclasses.field(default_factory=list)       # (seconds, replica, pid)


async def baseline(address: str, token, streams: int, new_tokens: int) -> tuple[dict[int, list[int]], float]:
    """Every prompt once, `streams` at a time: (prompt index -> tokens, tokens/s)."""
    reference, semaphore = {}, asyncio.Semaphore(streams)
    async with AsyncClient(address, timeout=300, token=token) as client:
        async def one(index):
            async with semaphore:
                generation = await client.generate_all(PROMPTS[index], max_new_tokens=new_tokens, ignore_eos=True)
                reference[index] = list(generation.token_ids)
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
        elapsed = time.perf_counter() - start
    return reference, len(PROMPTS) * new_tokens / elapsed


async def wait_all_replicas_live(client: AsyncClient, name: str, count: int, stop_at: float) -> float:
    """Seconds spent until the router lists `count` reachable replicas of expert server `name`."""
    started = time.perf_counter()
    while time.perf_counter() < stop_at - 1:
        status = await client.cluster_status(timeout=10)
        server = next(s for s in status.servers if s.name == name)
        if len(set(server.replica_addresses) - set(server.unreachable_addresses)) >= count:
            break
        await asyncio.sleep(0.5)
    return time.perf_counter() - started


async def soak(launcher: Launcher, replicas: list[str], reference, args, tally: Tally) -> float:
    """Phase 2; returns tokens/s."""
    address, token = launcher.router_address, launcher.client_token
    start = time.perf_counter()
    stop_at = start + 60 * args.minutes
    async with AsyncClient(address, timeout=300, token=token) as client:
        async def stream(worker: int):
            index = worker
            while time.perf_counter() < stop_at:
                prompt = index % len(PROMPTS)
                try:
                    generation = await client.generate_all(PROMPTS[prompt], max_new_tokens=args.new_tokens,
                                                           ignore_eos=True)
                except ShardmeshError as error:
                    tally.errors.append((time.perf_counter() - start, str(error)[:300]))
                else:
                    tally.generations += 1
                    tally.tokens += len(generation.token_ids)
                    if list(generation.token_ids) != reference[prompt]:
                        tally.mismatches.append(prompt)
                index += args.streams

        async def killer():
            turn = 0
            while True:
                await asyncio.sleep(max(0.0, min(args.kill_every, stop_at - time.perf_counter() - 1)))
                if time.perf_counter() >= stop_at - 1:
                    return
                key = replicas[turn % len(replicas)]
                name, _, replica_id = key.partition("@")
                # Kill only while the other replica serves (the case: another replica of each of
                # its experts lives); killing the last live one is the "last holder dies" case instead.
                waited = await wait_all_replicas_live(client, name, len(replicas), stop_at)
                if waited > 1.0:
                    print(f"  {time.perf_counter() - start:6.1f} s: waited {waited:.1f} s for every {name} "
                          f"replica to be live before the next kill", flush=True)
                if time.perf_counter() >= stop_at - 1:
                    return
                process = launcher.processes[key]
                process.send_signal(signal.SIGKILL)
                process.wait()
                tally.kills.append((time.perf_counter() - start, key, process.pid))
                print(f"  {time.perf_counter() - start:6.1f} s: SIGKILL {key} (pid {process.pid}); restarting it",
                      flush=True)
                launcher.add_expert_replica(name, replica_id)  # processes[f"{name}@{replica_id}"]
                turn += 1

        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(stream(w) for w in range(args.streams)))
        kill_task.cancel()
        await asyncio.gather(kill_task, return_exceptions=True)
    return tally.tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--shape", default="small", choices=sorted(harness.SHAPES))
    parser.add_argument("--logs", type=pathlib.Path, metavar="DIR", help="copy the services' logs here at the end")
    parser.add_argument("--log-level", default="WARNING", help="the services' log level")
    args = parser.parse_args()
    model_dir = harness.checkpoint(args.shape)
    with Launcher(model_dir, progress=lambda m: print(" ", m, flush=True), log_level=args.log_level) as launcher:
        first = launcher.topology.expert_servers[0].name
        # The launcher's own process of `first` is processes[first]; keep both replicas under
        # "name@replica_id" keys so that a restart (add_expert_replica) replaces the entry.
        launcher.processes[f"{first}@"] = launcher.processes.pop(first)
        launcher.add_expert_replica(first, "soak")
        replicas = [f"{first}@", f"{first}@soak"]
        asyncio.run(wait_for_replicas(launcher, first, 2))
        print(f"mesh up at {launcher.router_address}; {first} has 2 replicas", flush=True)
        reference, base_rate = asyncio.run(baseline(launcher.router_address, launcher.client_token, args.streams,
                                                    args.new_tokens))
        services = {key: process.pid for key, process in launcher.processes.items()}
        before = {key: rss_kib(pid) for key, pid in services.items()}
        tally = Tally()
        print(f"soak: {args.minutes:g} min, {args.streams} streams, SIGKILL every {args.kill_every:g} s", flush=True)
        rate = asyncio.run(soak(launcher, replicas, reference, args, tally))
        after = {key: rss_kib(pid) for key, pid in services.items()}
        alive = {key: launcher.processes[key].pid for key in launcher.processes}
        if args.logs is not None:  # the services' logs (the launcher's directory goes with it)
            args.logs.mkdir(parents=True, exist_ok=True)
            for log_file in launcher.workdir.glob("*.log"):
                shutil.copy(log_file, args.logs / log_file.name)
    report(args, base_rate, rate, tally, services, before, after, alive)
    return 0 if not tally.errors and not tally.mismatches else 1


async def wait_for_replicas(launcher: Launcher, name: str, count: int, timeout: float = 120.0) -> None:
    async with AsyncClient(launcher.router_address, timeout=10, token=launcher.client_token) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await client.cluster_status()
            server = next(s for s in status.servers if s.name == name)
            if len(server.replica_addresses) >= count and status.serving:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{name} did not reach {count} registered replicas within {timeout:.0f} s")


def report(args, base_rate, rate, tally: Tally, services, before, after, alive) -> None:
    print(f"\nsoak {args.minutes:g} min, {args.streams} streams x {args.new_tokens} new tokens, "
          f"{len(tally.kills)} SIGKILLs (every {args.kill_every:g} s), machine: {os.cpu_count()} CPUs")
    print(f"  generations completed      : {tally.generations}")
    print(f"  errors                     : {len(tally.errors)}  (goal 0)")
    kinds: dict[str, list[float]] = {}
    for when, text in tally.errors:  # grouped by message, numbers masked
        kinds.setdefault(re.sub(r"\d+", "N", text), []).append(when)
    for text, times in sorted(kinds.items(), key=lambda kind: -len(kind[1]))[:8]:
        print(f"    {len(times):5d} x  {min(times):6.1f}-{max(times):6.1f} s  {text}")
    print(f"  tokens differing from the fault-free run: {len(tally.mismatches)} generations  (goal 0)")
    print(f"  tokens/s fault-free {base_rate:.1f}, under the soak {rate:.1f}: ratio {rate / base_rate:.3f}")
    print("  memory (VmRSS) per service, start -> end of the soak:")
    for key, pid in services.items():
        start, end = before.get(key), after.get(key)
        if end is None or alive.get(key) != pid:
            print(f"    {key:20s} {start} KiB -> (killed and restarted during the soak: a new process)")
        else:
            print(f"    {key:20s} {start} -> {end} KiB  {100 * (end - start) / start:+.1f}%  (goal < 5%)")


if __name__ == "__main__":
    sys.exit(main())
