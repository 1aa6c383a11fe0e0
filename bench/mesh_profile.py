"""A profiler attached to every process of a running mesh while it decodes: where a step's time goes.

    .venv/bin/python bench/mesh_profile.py [--config 1s1e-shm-c2] [--batch 16] [--tokens 128]
        [--profiler stat|record|sched|py-spy|none] [--out /tmp/mesh-profile]

Starts one mesh configuration (bench/mesh_configs.py) on the seeded checkpoint, warms it at the
batch size, then decodes `--tokens` tokens per sequence while the profiler records:
- `stat`: `perf stat -p` per process (task clock, context switches, migrations);
- `record`: `perf record -g -p` per process (`perf report -i <out>/record-<process>.data`);
- `sched`: `perf sched record -a` for 1.5 s, the whole machine (`perf sched timehist -i
  <out>/sched.data -w` shows which thread runs on which core, who wakes whom, and each wait);
- `py-spy`: `py-spy record -f raw` per process, 4 s (Python stacks; py-spy is not a dependency:
  put it on PATH or pass --py-spy);
- `none`: only the time per output token and the CPU ms per step of each process.
A profile answers questions a same-run ratio cannot (what runs on the critical path, what waits);
its figures are not results: profilers slow what they watch. Run it from outside any source tree
(python puts the working directory first on sys.path).
"""

import argparse
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import harness
import mesh_configs
from decode_throughput import make_prompts, run_mesh


def profilers(kind: str, pids: dict[str, int], out: pathlib.Path, py_spy: str) -> list[subprocess.Popen]:
    """Start `kind` on the mesh's processes (name -> pid); they write under `out`."""
    if kind == "none":
        return []
    if kind == "sched":
        return [subprocess.Popen(["perf", "sched", "record", "-a", "-o", str(out / "sched.data"), "--", "sleep", "1.5"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    commands = {
        "stat": lambda name, pid: ["perf", "stat", "-p", str(pid), "-o", str(out / f"stat-{name}.txt")],
        "record": lambda name, pid: ["perf", "record", "-g", "-F", "2000", "-p", str(pid),
                                     "-o", str(out / f"record-{name}.data")],
        "py-spy": lambda name, pid: [py_spy, "record", "-r", "997", "-f", "raw", "-d", "4", "--nonblocking",
                                     "--pid", str(pid), "-o", str(out / f"py-spy-{name}.txt")],
    }
    return [subprocess.Popen(commands[kind](name, pid), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in pids.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="1s1e-shm-c2", choices=list(mesh_configs.CONFIGS))
    parser.add_argument("--small", action="store_true", help="a small Mixtral instead of the issue's shape")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per sequence while profiling")
    parser.add_argument("--profiler", default="stat", choices=["stat", "record", "sched", "py-spy", "none"])
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable (--profiler py-spy)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "mesh-profile")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=harness.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    tool = {"py-spy": args.py_spy, "none": None}.get(args.profiler, "perf")
    if tool is not None and shutil.which(tool) is None:
        parser.error(f"--profiler {args.profiler} needs {tool!r} on PATH")
    from shardmesh.config import ModelConfig
    from shardmesh.launcher import Launcher

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = harness.checkpoint("small" if args.small else "default", args.cache_dir)
    config = ModelConfig.from_dir(model_dir)
    prompts = make_prompts(config.vocab_size, args.batch, 16)
    mesh = mesh_configs.CONFIGS[args.config]
    with tempfile.TemporaryDirectory(prefix="bench-mesh-profile-") as workdir, harness.environment(mesh.env):
        topology_file = mesh.write(pathlib.Path(workdir) / "topology.toml", config)
        with Launcher(model_dir, topology_file, threads_per_service=mesh.thread_counts,
                      service_args=mesh.service_args, log_level="WARNING", no_auth=True) as launcher:
            pids = {name: process.pid for name, process in launcher.processes.items()}
            print("processes: " + ", ".join(f"{name} {pid}" for name, pid in pids.items()), flush=True)
            run_mesh(launcher.router_address, launcher.client_token, prompts, 16, 1, pids)  # warm at this batch
            running = profilers(args.profiler, pids, args.out, args.py_spy)
            time.sleep(0.5 if running else 0)  # attached before the decode starts
            result = run_mesh(launcher.router_address, launcher.client_token, prompts, args.tokens, 1, pids)
            for profiler in running:
                if args.profiler != "sched":  # sched records a fixed window; the others stop on SIGINT
                    profiler.send_signal(signal.SIGINT)
            for profiler in running:
                profiler.wait(timeout=60)
    print(f"{args.config} batch {args.batch}: {result['tpot_s'] * 1e3:.2f} ms per output token; CPU ms per step: "
          + ", ".join(f"{name} {seconds * 1e3:.1f}" for name, seconds in result["cpu_by_process"].items()))
    if running:
        print(f"profiles in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
