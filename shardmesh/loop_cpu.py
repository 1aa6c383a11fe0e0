"""`--loop-cpu N`: a service's event-loop thread on CPU N, every other thread of it on the others.

Services of one host that take turns (a stage waits while its expert server computes, the router
waits for the stage's step) hand work to each other many times per decode step: a frame written
on one side wakes the other side's event-loop thread. When that thread sleeps on an idle CPU, the
wake-up costs ~50-100 us on a virtual machine (the idle virtual CPU halted and must be run again);
on the CPU the writer is running, it is a context switch of a few microseconds. So every service
of such a host is given the same loop CPU, and their compute helpers (the C kernels' team, the
compute pool, gRPC's threads) the rest: the thread woken is always where the writer
ran, and a layer's kernel still spreads over every CPU (`bench/tree_ab.py --config 1s1e-shm-c2
--config-b 1s1e-shm-c2-loop0` measures it).

Only for services that take turns: two services computing at once (micro-batches in flight,
stages of one step on other hosts' experts) would share one CPU for their Python. Linux only.
"""

import logging
import os
import threading

log = logging.getLogger(__name__)


def check(loop_cpu: int, torch_threads: int) -> set[int]:
    """The CPUs left to the other threads when the loop runs on `loop_cpu`; ValueError naming
    --loop-cpu or --threads when this process may not run there, or when torch would start its
    own threads on the loop's CPU."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--loop-cpu: this system cannot pin threads to CPUs (Linux only)")
    allowed = os.sched_getaffinity(0)
    if loop_cpu not in allowed:
        raise ValueError(f"--loop-cpu {loop_cpu}: this process may run on CPUs {sorted(allowed)} only")
    if torch_threads != 1:
        raise ValueError(f"--loop-cpu needs --threads 1 (got {torch_threads}): torch's threads start from the "
                         f"event loop's thread and would share its CPU; --compute-threads spreads the kernels")
    return _left(loop_cpu)


def _left(loop_cpu: int) -> set[int]:
    """The CPUs this process may run on but `loop_cpu` (all of them on a 1-CPU allowance)."""
    allowed = os.sched_getaffinity(0)
    return allowed - {loop_cpu} or allowed


def pin(loop_cpu: int) -> set[int]:
    """Run the calling thread (the event loop's) on `loop_cpu` and every other thread of this process,
    now and later (the kernels' team, the compute pool), on the CPUs left; returns those CPUs.
    Call `check` first."""
    from shardmesh import compute_pool, kernels

    others = _left(loop_cpu)
    kernels.pin_helpers(others)
    compute_pool.pin_workers(others)
    me = threading.get_native_id()
    for task in os.listdir("/proc/self/task"):  # gRPC's threads and any already started
        if int(task) != me:
            try:
                os.sched_setaffinity(int(task), others)
            except (ProcessLookupError, PermissionError):
                pass  # a thread that ended meanwhile; one we may not move keeps its CPUs
    os.sched_setaffinity(0, {loop_cpu})
    log.info("event loop on CPU %d, other threads on CPUs %s", loop_cpu, sorted(others))
    return others
