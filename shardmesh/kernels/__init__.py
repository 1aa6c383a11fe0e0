"""CPU kernels in C for the few-row fp32 products of a decode step, compiled at first use.

`expert_ffn.c` holds the kernels (why they beat MKL at 1-16 rows is said there) and includes
`linear_wide.c` (the outer-product form for 17-64 rows); `decode_attention.c` (models/decode_attention.py) is
compiled with it into the same library; the cache key hashes every .c file here. `kernel()` compiles
it with the system C compiler (`$SHARDMESH_KERNEL_CC`, else `$CC`, else `cc`) with `-O3 -march=native`
into a cache directory (`$SHARDMESH_KERNEL_DIR`, else ~/.cache/shardmesh/kernels) under a name that
hashes the source, the compiler's identity, the flags and this CPU's model and feature flags, so a
cache shared between machines never serves code built for another CPU; the library is written to a
temporary name and renamed into place, so processes compiling at once each see a whole file. It is
loaded with ctypes, which releases the GIL for the call: the compute pool's threads run kernels in
parallel (shardmesh.compute_pool). `expert_ffn_many` runs a layer's experts on helper threads of
its own (expert_team.c: pthreads, asleep between calls; no OpenMP: torch ships its own);
`linear_team` and decode_layer.c (models/decode_layer.py: a decode layer's attention half in one call)
run on another such team (team.c), as does lm_head_amx.c (shardmesh/greedy_head.py: the greedy LM head
on AMX, compiled in only where -march=native gives AMX-INT8).

Off (`SHARDMESH_CPU_KERNELS=0`), without a compiler, or when compiling fails, `kernel()` is None
and callers keep their torch path; one log line says why. `calls` counts kernel calls (tests read it).
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("expert_ffn.c")
ATTENTION_SOURCE = SOURCE.with_name("decode_attention.c")  # compiled alongside (models/decode_attention.py wraps it)
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11", "-pthread")
MAX_KEPT_SCRATCH = 4 << 20  # floats (16 MiB): expert scratch up to this is one buffer per thread, reused
WIDE_PASS_ROWS = 64  # rows per pass of linear_wide (WIDE_MAX_VECTORS x 16 lanes at most)
calls = {"expert_ffn": 0, "expert_ffn_many": 0, "linear": 0, "linear_wide": 0,
         "decode_attention": 0, "decode_layer": 0, "linear_team": 0,
         "greedy_head": 0, "greedy_head_fallback": 0}  # kernel calls in this process, by kernel
units = {"by_helpers": 0, "team_by_helpers": 0}  # units computed by helper threads in this process (tests, benches):
# expert_ffn_many's (expert_team.c), decode_layer's and linear_team's (team.c)


class ExpertTask(ctypes.Structure):
    """struct shardmesh_expert_task (expert_team.c): one expert's rows and weights."""
    _fields_ = [("n", ctypes.c_long)] + [(name, ctypes.c_void_p) for name in
                                         ("x", "w1", "w3", "w2", "scratch", "out")]


class ExpertTable:
    """A list of experts for Kernel.expert_ffn_packed, their weights' addresses read once: an
    ExpertTask array whose w1, w3, w2 are set (a call fills n, x, scratch and out). A call at a time
    uses it; a concurrent one builds its own tasks (the `lock` is taken without waiting)."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.weights = list(weights)  # (gate_proj [I, H], up_proj [I, H], down_proj [H, I]) each, kept alive here
        self.intermediate = self.weights[0][0].shape[0] if self.weights else 0
        assert all(gate_proj.shape[0] == self.intermediate for gate_proj, _, _ in self.weights), "one I for all experts"
        self.tasks = (ExpertTask * len(self.weights))()
        for task, (gate_proj, up_proj, down_proj) in zip(self.tasks, self.weights):
            task.w1, task.w3, task.w2 = gate_proj.data_ptr(), up_proj.data_ptr(), down_proj.data_ptr()
        self.counts = (ctypes.c_long * len(self.weights))()  # a call's rows per task, for the kernel to fill n, x, ...
        self.lock = threading.Lock()


class Kernel:
    """The loaded library: ctypes functions over contiguous fp32 CPU tensors (callers check that)."""

    def __init__(self, library: ctypes.CDLL, path: pathlib.Path):
        self.path, self.library = path, library
        self._expert_ffn = library.shardmesh_expert_ffn
        self._expert_ffn.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p] * 6
        self._expert_ffn.restype = None
        self._expert_ffn_many = library.shardmesh_expert_ffn_many
        self._expert_ffn_many.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
        self._expert_ffn_many.restype = ctypes.c_long
        self._expert_ffn_packed = library.shardmesh_expert_ffn_packed
        self._expert_ffn_packed.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_long]
        self._expert_ffn_packed.restype = ctypes.c_long
        self._scratch = threading.local()  # .held: (tensor, address, floats) kept by each thread (scratch)
        self._linear = library.shardmesh_linear
        self._linear.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p] * 3
        self._linear.restype = None
        self._linear_wide = library.shardmesh_linear_wide
        self._linear_wide.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p] * 4
        self._linear_wide.restype = None
        self._linear_team = library.shardmesh_linear_team
        self._linear_team.argtypes = [ctypes.c_long] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_long]
        self._linear_team.restype = ctypes.c_long

    def expert_ffn(self, hidden_states: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                   down_proj: torch.Tensor) -> torch.Tensor:
        """down (silu(gate x) * (up x)): hidden_states [n, H], gate_proj/up_proj [I, H], down_proj
        [H, I], all contiguous fp32 on the CPU -> [n, H]."""
        n, hidden = hidden_states.shape
        intermediate = gate_proj.shape[0]
        out = torch.empty(n, hidden, dtype=torch.float32)
        if n == 0:
            return out
        scratch = torch.empty(2, n, intermediate, dtype=torch.float32)  # gate, up: [2, n, I]
        calls["expert_ffn"] += 1
        self._expert_ffn(n, hidden, intermediate, hidden_states.data_ptr(), gate_proj.data_ptr(),
                         up_proj.data_ptr(), down_proj.data_ptr(), scratch.data_ptr(), out.data_ptr())
        return out

    def expert_ffn_many(self, experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                        threads: int, unit_bytes: int = 256 * 1024) -> list[torch.Tensor]:
        """[expert_ffn(*e) for e in experts], each expert (hidden_states [n, H], gate_proj, up_proj,
        down_proj, with one H and I for all) cut into pieces of ~unit_bytes of weights taken by this
        thread and threads - 1 helper threads of the library (expert_team.c); bit-identical to
        expert_ffn for any threads and unit_bytes."""
        outputs = [torch.empty(e[0].shape[0], e[0].shape[1], dtype=torch.float32) for e in experts]
        work = [(x.shape[0], x.data_ptr(), weights, out.data_ptr())
                for (x, *weights), out in zip(experts, outputs) if x.shape[0]]
        if work:
            assert all(x.shape[1] == experts[0][0].shape[1] for x, *_ in experts), "one H for all experts"
            self._run_team(work, experts[0][0].shape[1], threads, unit_bytes)
        return outputs

    def expert_ffn_packed(self, hidden_states: torch.Tensor, weights: list[tuple[torch.Tensor, ...]] | ExpertTable,
                          counts: list[int], threads: int, out: torch.Tensor, unit_bytes: int = 256 * 1024) -> None:
        """expert_ffn_many on one packed tensor: rows [N, H] of hidden_states, the first counts[0] for
        weights[0] (gate_proj, up_proj, down_proj), the next counts[1] for weights[1], ..., computed
        into the same rows of `out` [N, H] (no tensor per expert made either way); the same bits.
        `weights` may be an ExpertTable of them (what a caller computing the same experts again keeps)."""
        if isinstance(weights, ExpertTable):
            if len(counts) == len(weights.tasks) and 0 not in counts and weights.lock.acquire(blocking=False):
                try:
                    self._run_table(hidden_states, weights, counts, threads, out, unit_bytes)
                finally:
                    weights.lock.release()
                return
            weights = weights.weights
        hidden = hidden_states.shape[1]
        row_bytes, x, y, work = 4 * hidden, hidden_states.data_ptr(), out.data_ptr(), []
        for count, expert_weights in zip(counts, weights):
            if count:
                work.append((count, x, expert_weights, y))
                x, y = x + count * row_bytes, y + count * row_bytes
        if work:
            self._run_team(work, hidden, threads, unit_bytes)

    def scratch(self, floats: int) -> tuple[torch.Tensor, int]:
        """Room for `floats` fp32 (uninitialized; the kernels write their scratch before reading it):
        (a tensor holding it, its address). Up to MAX_KEPT_SCRATCH floats it is one buffer kept per
        thread and reused, so a call neither allocates nor page-faults on fresh pages (a kernel's
        scratch is in use only during its call, on its thread); bigger ones are made per call."""
        held = getattr(self._scratch, "held", None)
        if held is not None and held[2] >= floats:
            return held[0], held[1]
        tensor = torch.empty(max(floats, 1), dtype=torch.float32)
        if floats <= MAX_KEPT_SCRATCH:
            self._scratch.held = (tensor, tensor.data_ptr(), tensor.numel())
        return tensor, tensor.data_ptr()

    def _run_table(self, hidden_states: torch.Tensor, table: ExpertTable, counts: list[int], threads: int,
                   out: torch.Tensor, unit_bytes: int) -> None:
        """expert_ffn_packed on the table's tasks (every count >= 1, one per task): the kernel fills in
        their rows and scratch addresses from the counts, the weights' are there already."""
        hidden, intermediate = hidden_states.shape[1], table.intermediate
        scratch, address = self.scratch(2 * intermediate * hidden_states.shape[0])  # [2, n, I] per expert
        table.counts[:] = counts
        calls["expert_ffn_many"] += 1
        by_helpers = self._expert_ffn_packed(len(counts), hidden, intermediate, table.tasks, table.counts,
                                             hidden_states.data_ptr(), address, out.data_ptr(), threads, unit_bytes)
        if by_helpers < 0:
            raise MemoryError("shardmesh_expert_ffn_many: out of memory")
        units["by_helpers"] += by_helpers

    def _run_team(self, work: list[tuple[int, int, tuple[torch.Tensor, ...], int]], hidden: int, threads: int,
                  unit_bytes: int) -> None:
        """work: (rows n, input address [n, H], (gate_proj, up_proj, down_proj), output address [n, H]) each."""
        intermediate = work[0][2][0].shape[0]
        scratch, offset = self.scratch(2 * intermediate * sum(n for n, *_ in work))
        tasks = (ExpertTask * len(work))()
        for task, (n, x, (gate_proj, up_proj, down_proj), out) in zip(tasks, work):
            assert gate_proj.shape[0] == intermediate, "one I for all experts"
            task.n, task.x, task.w1, task.w3, task.w2 = n, x, gate_proj.data_ptr(), up_proj.data_ptr(), \
                down_proj.data_ptr()
            task.scratch, task.out = offset, out  # scratch [2, n, I] each
            offset += 4 * 2 * n * intermediate
        calls["expert_ffn_many"] += 1
        by_helpers = self._expert_ffn_many(len(work), hidden, intermediate, tasks, threads, unit_bytes)
        if by_helpers < 0:
            raise MemoryError("shardmesh_expert_ffn_many: out of memory")
        units["by_helpers"] += by_helpers

    def linear(self, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """inputs [n, K] @ weight [M, K]^T -> [n, M], both contiguous fp32 on the CPU."""
        n, features_in = inputs.shape
        out = torch.empty(n, weight.shape[0], dtype=torch.float32)
        if n == 0:
            return out
        calls["linear"] += 1
        self._linear(n, features_in, weight.shape[0], inputs.data_ptr(), weight.data_ptr(), out.data_ptr())
        return out

    def linear_team(self, inputs: torch.Tensor, weight: torch.Tensor, threads: int,
                    unit_bytes: int = 256 * 1024) -> torch.Tensor:
        """`linear` (the same bits) with the output features cut into ranges of ~unit_bytes of weights,
        taken by this thread and threads - 1 helper threads of the library (team.c): inputs [n, K] @
        weight [M, K]^T -> [n, M], both contiguous fp32 on the CPU."""
        n, features_in = inputs.shape
        out = torch.empty(n, weight.shape[0], dtype=torch.float32)
        if n == 0:
            return out
        calls["linear_team"] += 1
        units["team_by_helpers"] += self._linear_team(n, features_in, weight.shape[0], inputs.data_ptr(),
                                                      weight.data_ptr(), out.data_ptr(), threads, unit_bytes)
        return out

    def pin_helpers(self, cpus: list[int]) -> None:
        """Run the team's helper threads, started and to come, on these CPUs only (shardmesh.loop_cpu)."""
        array = (ctypes.c_int * len(cpus))(*cpus)
        failed = self.library.shardmesh_team_pin_helpers(array, len(cpus))
        if failed:
            raise OSError(failed, f"moving the kernel team's helpers to CPUs {cpus}: {os.strerror(failed)}")

    def linear_wide(self, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`linear` in the outer-product form (faster from ~17 rows): inputs [n, K] @ weight [M, K]^T
        -> [n, M], both contiguous fp32 on the CPU. Each row's result is the same bits for any n."""
        n, features_in = inputs.shape
        out = torch.empty(n, weight.shape[0], dtype=torch.float32)
        if n == 0:
            return out
        # the packed inputs [K, up to 64 rows], 64-byte aligned: 16 spare floats to shift into alignment
        spare = torch.empty(features_in * WIDE_PASS_ROWS + 16, dtype=torch.float32)
        offset = (-spare.data_ptr() // 4) % 16
        calls["linear_wide"] += 1
        self._linear_wide(n, features_in, weight.shape[0], inputs.data_ptr(), weight.data_ptr(), out.data_ptr(),
                          spare.data_ptr() + 4 * offset)
        return out


def compiler() -> str | None:
    """The C compiler's path, or None when there is none."""
    name = os.environ.get("SHARDMESH_KERNEL_CC") or os.environ.get("CC") or "cc"
    return shutil.which(name)


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SHARDMESH_KERNEL_DIR") or pathlib.Path.home() / ".cache" / "shardmesh" / "kernels")


def _cpu_identity() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(wanted))


def library_path(cc: str) -> pathlib.Path:
    """Where the library built by `cc` for this source, flags and CPU lives in the cache."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = [SOURCE.read_text()] + [path.read_text() for path in sorted(SOURCE.parent.glob("*.c")) if path != SOURCE]
    key = hashlib.sha256("\0".join([*sources, cc, version, " ".join(FLAGS), platform.machine(),
                                    _cpu_identity()]).encode()).hexdigest()[:24]
    return cache_dir() / f"expert_ffn-{key}.so"


def build(cc: str) -> pathlib.Path:
    """Compile into the cache unless it is there already; returns the library's path."""
    path = library_path(cc)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        result = subprocess.run([cc, *FLAGS, "-o", temporary, str(SOURCE), str(ATTENTION_SOURCE), "-lm"],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, path)  # atomic: a concurrent compile renames an identical file
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    log.info("compiled the CPU kernels into %s", path)
    return path


@functools.lru_cache(maxsize=None)
def kernel() -> Kernel | None:
    """The compiled kernels, or None (then one log line says why and callers use torch)."""
    if os.environ.get("SHARDMESH_CPU_KERNELS", "1") == "0":
        log.info("CPU kernels off (SHARDMESH_CPU_KERNELS=0): experts and linears use torch")
        return None
    cc = compiler()
    if cc is None:
        log.warning("no C compiler found (SHARDMESH_KERNEL_CC / CC / cc): experts and linears use torch")
        return None
    try:
        path = build(cc)
        loaded = Kernel(ctypes.CDLL(str(path)), path)
        if _helper_cpus:
            loaded.pin_helpers(_helper_cpus)
        return loaded
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("CPU kernels unavailable (%s): experts and linears use torch", error)
        return None


_helper_cpus: list[int] = []  # where the team's helpers run (pin_helpers); []: where they start


def pin_helpers(cpus: set[int]) -> None:
    """Run the kernel team's helper threads on these CPUs (shardmesh.loop_cpu): now if the library is
    loaded, else once `kernel()` loads it (this never compiles it: a router has no kernels)."""
    global _helper_cpus
    _helper_cpus = sorted(cpus)
    if kernel.cache_info().currsize and kernel() is not None:
        kernel().pin_helpers(_helper_cpus)


def switched_function(switch: str, name: str, argtypes: list, restype):
    """The library's ctypes function `name` with this signature, or None when the kernels are off or
    unavailable or the environment variable `switch` is "0" (a kernel's own off switch, for A/B runs).
    Callers cache it (functools.lru_cache) and clear that cache when they change the switch."""
    loaded = kernel()
    if loaded is None or os.environ.get(switch, "1") == "0":
        return None
    function = getattr(loaded.library, name)
    function.argtypes, function.restype = argtypes, restype
    return function


_logged: set[tuple] = set()  # (purpose, device type, dtype) fallbacks logged in this process, each once


def for_weights(purpose: str, *weights: torch.Tensor) -> Kernel | None:
    """The kernel for layers over these weights, or None (torch), logging the reason once per process.
    Weights it cannot take (another device or dtype) never make it compile."""
    if usable(*weights):
        return kernel()
    weight = weights[0]
    reason = (purpose, weight.device.type, weight.dtype)
    if reason not in _logged:
        _logged.add(reason)
        log.info("%s on %s in %s use torch (the CPU kernels take contiguous float32 on the CPU)", *reason)
    return None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go to a kernel: contiguous fp32 on the CPU."""
    return all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
