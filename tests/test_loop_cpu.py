"""--loop-cpu (shardmesh/loop_cpu.py): a service's event-loop thread on one CPU, its other threads
(the kernels' team helpers, started before or after, the compute pool, gRPC's) on the others; the
checks that refuse a CPU the process may not use or torch threads that would share the loop's CPU;
and a real mesh pinned that way giving transformers' tokens."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest

from shardmesh import loop_cpu
from shardmesh.client import AsyncClient
from shardmesh.launcher import Launcher
from shardmesh.reference import transformers_greedy

from fault_helpers import run_stream

ALLOWED = sorted(os.sched_getaffinity(0))
LOOP = ALLOWED[0]
OTHERS = sorted(set(ALLOWED) - {LOOP}) or [LOOP]  # a 1-CPU machine: everything on it


def thread_cpus(pid: int) -> dict[int, list[int]]:
    """thread id -> the CPUs it may run on, for every thread of process `pid`."""
    return {int(tid): sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_check_names_the_flag_for_a_cpu_this_process_may_not_use():
    with pytest.raises(ValueError, match=r"--loop-cpu 4096: this process may run on CPUs"):
        loop_cpu.check(4096, 1)
    with pytest.raises(ValueError, match=r"--loop-cpu needs --threads 1 \(got 2\)"):
        loop_cpu.check(LOOP, 2)
    assert loop_cpu.check(LOOP, 1) == set(OTHERS)


PINNED_PROCESS = textwrap.dedent("""
    import json, os, sys, threading, torch
    torch.set_num_threads(1)
    from shardmesh import compute_pool, kernels, loop_cpu
    compute_pool.set_threads(2)
    kernel = kernels.kernel()
    assert kernel is not None, "the C kernels compile here"
    loop, others, started_first = {loop}, {others}, {started_first}
    x, w = torch.randn(4, 64), torch.randn(4096, 64)
    expected = x @ w.T
    before = set(os.listdir("/proc/self/task"))
    if started_first:  # the team's helper runs, on every CPU; the kernels alone move it
        kernel.linear_team(x, w, 2, unit_bytes=4096)
        kernels.pin_helpers(set(others))
    else:  # the whole process pinned before any helper starts
        loop_cpu.pin(loop)
    out = kernel.linear_team(x, w, 2, unit_bytes=4096)
    helpers = set(os.listdir("/proc/self/task")) - before
    pool = compute_pool.parallel_map(lambda _: threading.get_native_id(), [0, 1, 2, 3])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    cpus = {{int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}}
    print(json.dumps(dict(main=threading.get_native_id(), helpers=sorted(map(int, helpers)), pool=pool, cpus=cpus)))
""")


def pinned_process(started_first: bool) -> tuple[dict, dict[int, list[int]]]:
    script = PINNED_PROCESS.format(loop=LOOP, others=OTHERS, started_first=started_first)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    return report, {int(tid): value for tid, value in report["cpus"].items()}


def test_the_kernels_move_their_running_helpers():
    report, cpus = pinned_process(started_first=True)
    assert report["helpers"], "the team job started a helper thread"
    assert all(cpus[tid] == OTHERS for tid in report["helpers"]), report
    assert cpus[report["main"]] == ALLOWED  # only the helpers moved


def test_pin_puts_the_loop_on_its_cpu_and_threads_started_later_on_the_others():
    report, cpus = pinned_process(started_first=False)
    assert cpus[report["main"]] == [LOOP]
    assert report["helpers"], "the team job started a helper thread"
    for tid, allowed in cpus.items():
        if tid != report["main"]:
            assert allowed == OTHERS, (tid, allowed, report)
    pool_threads = set(report["pool"]) - {report["main"]}
    assert pool_threads and all(cpus[tid] == OTHERS for tid in pool_threads), report


def test_a_mesh_with_every_loop_on_one_cpu_gives_transformers_tokens(mixtral_dir):
    args = ["--loop-cpu", str(LOOP)]
    prompts = [[1, 9, 27, 81], [5, 6, 7]]
    with Launcher(mixtral_dir, no_auth=True, compute_threads=2, log_level="INFO",
                  service_args={"router": args, "stage": args, "expert": args}) as mesh:
        async def generate():
            async with AsyncClient(mesh.router_address) as client:
                return await asyncio.gather(*(run_stream(client, prompt, 6) for prompt in prompts))

        results = asyncio.run(generate())
        for prompt, result in zip(prompts, results):
            assert result.error is None and result.tokens == transformers_greedy(mixtral_dir, prompt, 6,
                                                                                   ignore_eos=True)
        for name, process in mesh.processes.items():
            cpus = thread_cpus(process.pid)
            assert cpus.pop(process.pid) == [LOOP], (name, "event loop")
            assert cpus and all(allowed == OTHERS for allowed in cpus.values()), (name, cpus)
            assert f"event loop on CPU {LOOP}" in mesh.log_tail(name, 200), name


def test_a_service_refuses_a_loop_cpu_it_may_not_use(mixtral_dir):
    result = subprocess.run([sys.executable, "-m", "shardmesh.cli", "router", "--model", str(mixtral_dir),
                             "--no-auth", "--loop-cpu", "4096"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--loop-cpu 4096: this process may run on CPUs" in result.stderr, result.stderr


def test_up_refuses_a_bad_loop_cpu_before_starting_anything(mixtral_dir):
    result = subprocess.run([sys.executable, "-m", "shardmesh.cli", "up", "--model", str(mixtral_dir), "--no-auth",
                             "--loop-cpu", str(LOOP), "--threads", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--loop-cpu needs --threads 1 (got 2)" in result.stderr, result.stderr
    assert "starting" not in result.stdout
