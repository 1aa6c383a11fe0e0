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
