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
