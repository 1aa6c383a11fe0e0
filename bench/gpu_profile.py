"""Where a small-batch decode step goes on a device: the cost of one kernel launch (queued, and
launched then waited for) and a torch.profiler table of a few decode steps (CPU side: every CUDA
runtime call and aten op, all threads), used by gpu_throughput.py --profile.

A batch-1 step of an 8-layer MoE model launches hundreds of small kernels and, in the mesh, waits on
the device before each hop; when a launch or a synchronize costs tens of microseconds (some
virtualised machines), that, not the weights' bandwidth, sets the step time. These figures say so.
"""

import time
import torch


def launch_cost(device: str, launches: int = 2000) -> tuple[float, float]:
    """(seconds per queued launch of a one-element add, seconds per launch + synchronize)."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(launches):
        x.add_(1)
    queued = (time.perf_counter() - start) / launches
    torch.cuda.synchronize(device)
    rounds = launches // 10
    start = time.perf_counter()
    for _ in range(rounds):
        x.add_(1)
        torch.cuda.synchronize(device)
    return queued, (time.perf_counter() - start) / rounds


class Recorder:
    """`with Recorder() as recorder: <steps>` then `recorder.table(label, steps)`: a markdown section
    with the CUDA launches and synchronizations per step, then the top entries by self CPU time."""

    def __enter__(self) -> "Recorder":
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)

    def table(self, label: str, steps: int, rows: int = 18) -> str:
        averages = self._profile.key_averages()
        per_step = dict.fromkeys(("cudaLaunchKernel", "cudaStreamSynchronize", "cudaMemcpyAsync",
                                  "cudaDeviceSynchronize", "cudaEventSynchronize"), 0)
        for event in averages:
            if event.key in per_step:
                per_step[event.key] = event.count
        counts = ", ".join(f"{name} {count / steps:.0f}" for name, count in per_step.items() if count)
        return "\n".join([f"## {label}", "", f"CUDA runtime calls per step: {counts or 'none'}; table: all steps together", "", "```",
                          averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48),
                          "```", ""])


class ClockSampler:
    """`with ClockSampler(pids) as clocks: <timed work>` then `clocks.summary()`: the GPU's SM clock
    and utilisation, sampled by `nvidia-smi -lms 100` while the work ran ("" without nvidia-smi), and
    `clocks.cpu_seconds`: host CPU (user + system) used meanwhile by this process and `pids`. A GPU
    busy a few percent of a step at full clock is waiting on the host: then the host's CPU time per
    step, not the weights' bandwidth, sets the step time."""

    def __init__(self, pids=()):
        self.pids = list(pids)
        self.cpu_seconds = 0.0

    def __enter__(self) -> "ClockSampler":
        import shutil
        import subprocess

        import harness

        self._cpu_start = harness.cpu_seconds([]) + (harness.cpu_seconds(self.pids) if self.pids else 0)
        self._process = None
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        import harness

        self.cpu_seconds = harness.cpu_seconds([]) + (harness.cpu_seconds(self.pids) if self.pids else 0) - self._cpu_start
        if self._process is not None:
            self._process.terminate()
            output, _ = self._process.communicate(timeout=10)
            self._samples = [tuple(float(v) for v in line.split(",")[:2]) for line in output.splitlines()
                             if line.count(",") >= 1 and line.split(",")[0].strip().replace(".", "").isdigit()]

    def summary(self) -> str:
        """'median SM MHz (median utilisation %)' over the samples, or ''."""
        import statistics

        samples = getattr(self, "_samples", [])
        if not samples:
            return ""
        return (f"{statistics.median(s[0] for s in samples):.0f} "
                f"({statistics.median(s[1] for s in samples):.0f}%)")


class MpsDaemon:
    """`with MpsDaemon() as mps:` runs an NVIDIA MPS control daemon for the processes started inside
    (they find it through CUDA_MPS_PIPE_DIRECTORY, set here and inherited), so that several service
    processes on one GPU share it without time-slicing between their contexts. `mps.error` says why
    not ('' when it runs)."""

    def __enter__(self) -> "MpsDaemon":
        import os
        import shutil
        import subprocess
        import tempfile

        self.error, self._env = "", None
        control = shutil.which("nvidia-cuda-mps-control")
        if control is None:
            self.error = "nvidia-cuda-mps-control not found"
            return self
        folder = tempfile.mkdtemp(prefix="shardmesh-mps-")
        self._env = {"CUDA_MPS_PIPE_DIRECTORY": f"{folder}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{folder}/log"}
        for path in self._env.values():
            os.makedirs(path)
        result = subprocess.run([control, "-d"], env={**os.environ, **self._env}, capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            self.error, self._env = f"nvidia-cuda-mps-control -d: exit {result.returncode} {result.stderr.strip()}", None
            return self
        os.environ.update(self._env)
        return self

    def __exit__(self, *exc) -> None:
        import os
        import shutil
        import subprocess

        if self._env is None:
            return
        subprocess.run([shutil.which("nvidia-cuda-mps-control")], input="quit\n", env={**os.environ}, text=True,
                       capture_output=True, timeout=30)
        for name in self._env:
            os.environ.pop(name, None)


class StackSampler:
    """`with StackSampler() as stacks: <steps>` then `stacks.table(rows)`: where the thread that
    entered spends its wall time, by sampling its Python stack every `interval_s` from another
    thread (sys._current_frames): the innermost frame of each sample, counted. Time inside a C call
    (a kernel launch, a device copy waiting for the GPU) counts at the Python line that made it, so
    this shows waits that torch.profiler's operator table does not. `all_threads`: every thread's
    innermost frame in each sample (threads asleep show where they wait), keyed by thread name."""

    def __init__(self, interval_s: float = 0.001, all_threads: bool = False):
        self.interval_s, self.all_threads = interval_s, all_threads
        self.counts: dict[str, int] = {}
        self.samples = 0

    def __enter__(self) -> "StackSampler":
        import threading

        self._target = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import sys

        import threading

        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            frames = sys._current_frames()
            names = {t.ident: t.name for t in threading.enumerate()} if self.all_threads else {}
            chosen = ([(ident, f) for ident, f in frames.items() if ident != me] if self.all_threads
                      else [(self._target, frames.get(self._target))])
            for ident, frame in chosen:
                if frame is None:
                    continue
                code = frame.f_code
                where = f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {code.co_name}"
                if self.all_threads:
                    where = f"[{names.get(ident, ident)}] {where}"
                self.counts[where] = self.counts.get(where, 0) + 1
            self.samples += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def table(self, label: str, rows: int = 15) -> str:
        top = sorted(self.counts.items(), key=lambda item: -item[1])[:rows]
        whose = "every thread" if self.all_threads else "the thread"
        lines = [f"## {label}: innermost Python frame of {whose}, {self.samples} samples every "
                 f"{self.interval_s * 1e3:g} ms", "", "| share | frame |", "| ---: | --- |"]
        lines += [f"| {100 * count / max(1, self.samples):.1f}% | `{where}` |" for where, count in top]
        return "\n".join([*lines, ""])
