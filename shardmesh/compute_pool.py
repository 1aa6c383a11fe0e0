"""Independent pieces of one step's compute run in parallel threads of this process.

torch releases the GIL inside its kernels, so with torch's own intra-op threads at 1, N pieces in
N threads (the experts of one layer on an expert server, slices of the LM head on the last stage)
keep N cores busy. Unlike torch's OpenMP threads, which spin after every kernel and so steal the
cores of the other services of a host, these threads sleep between pieces: services that take
turns on the same cores (a stage waits while its experts compute) each get all of them.

One pool per process, sized once at start (`set_threads`, from the service's --compute-threads);
with 1 thread (the default, and in-process test meshes) everything runs inline, in order.
A layer's whole experts on the C kernel do not come here: `threads()` sizes the kernel's own
helpers, which cut each expert into pieces (shardmesh.kernels expert_ffn_many, ExpertShard.compute_many).
"""

import concurrent.futures
import os
from collections.abc import Callable, Sequence

import torch

from shardmesh import kernels
from shardmesh.models.matmul import KERNEL_ROWS, linear

_threads = 1
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_worker_cpus: set[int] | None = None  # where the pool's threads run (pin_workers); None: where they start


def set_threads(threads: int) -> None:
    """Size this process's pool: `threads` pieces at once (the caller's thread is one of them)."""
    global _threads, _executor
    if threads < 1:
        raise ValueError(f"compute threads {threads} must be >= 1")
    if _executor is not None:
        _executor.shutdown(wait=True)
    _threads = threads
    # torch's thread count is per OpenMP thread: a worker left at the default would run every
    # kernel on an OpenMP team of all cores, spinning. Each worker takes the caller's setting.
    _executor = concurrent.futures.ThreadPoolExecutor(
        threads - 1, thread_name_prefix="compute", initializer=_start_worker,
        initargs=(torch.get_num_threads(),)) if threads > 1 else None


def pin_workers(cpus: set[int]) -> None:
    """Run the pool's threads on these CPUs (shardmesh.loop_cpu; they start lazily, from the caller's
    thread, whose CPU they would otherwise inherit)."""
    global _worker_cpus
    _worker_cpus = set(cpus)


def _start_worker(torch_threads: int) -> None:
    torch.set_num_threads(torch_threads)
    if _worker_cpus is not None:
        os.sched_setaffinity(0, _worker_cpus)  # 0: this thread


def threads() -> int:
    return _threads


def parallel_map(function: Callable, items: Sequence) -> list:
    """[function(item) for item in items], the items dealt round-robin over the pool's threads."""
    if _executor is None or len(items) < 2:
        return [function(item) for item in items]
    parts = min(_threads, len(items))

    def run(part: int) -> list:
        return [function(item) for item in items[part::parts]]

    futures = [_executor.submit(run, part) for part in range(1, parts)]
    results = [run(0)] + [future.result() for future in futures]
    merged = [None] * len(items)
    for part, part_results in enumerate(results):
        merged[part::parts] = part_results
    return merged


def parallel_linear(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear(inputs [n, in], weight [out, in]) -> [n, out] (models.matmul), the output features split over
    the pool's threads; at KERNEL_ROWS rows with the C kernel, over the library's team instead (one call,
    no Python threads: kernels.Kernel.linear_team, the same bits as linear; SHARDMESH_TEAM_LINEAR=0: off)."""
    if inputs.dim() == 2 and KERNEL_ROWS[0] <= inputs.shape[0] <= KERNEL_ROWS[1] \
            and os.environ.get("SHARDMESH_TEAM_LINEAR", "1") != "0":
        kernel = kernels.for_weights("dense linears", weight)
        if kernel is not None and kernels.usable(inputs):
            return kernel.linear_team(inputs, weight, _threads)
    if _executor is None or weight.shape[0] < 1024:
        return linear(inputs, weight)
    chunks = weight.chunk(_threads)  # views, no copy
    return torch.cat(parallel_map(lambda chunk: linear(inputs, chunk), chunks), dim=-1)
