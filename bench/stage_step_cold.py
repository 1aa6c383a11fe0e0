"""A stage's own decode step on cold caches, two source trees side by side (in process each, alternated).

    .venv/bin/python bench/stage_step_cold.py --a /work/main --b /path/to/clone [--batches 1 16]
        [--steps 10] [--rounds 20] [--compute-threads 2] [--flush-mb 16] [--parts]

Each tree runs in a worker process of its own (its PYTHONPATH) holding a StageModel of every layer
of the seeded checkpoint (the 1-stage mesh's stage: first and last), whose MoE layers call a fake
expert backend: it lends the dispatch its rows as RemoteExperts.lend does, answers each expert with
its own rows (identity experts: the combine reads them in place) and, inside the call, reads
`--flush-mb` MB of memory, as a stage's caches are flushed by the expert server's weights between
its layers. The backend's time is excluded. A step is what a stage server runs for a router's
step: StageModel.validate then forward(validated=True), greedy. Both workers are up at once; each
round runs `--steps` steps on A then B (B then A on odd rounds), so slow minutes hit both sides.
Prints per batch the median and quartiles of the per-round mean step (us), and median A / median B
(> 1: B is faster), with the load. --parts: where side B's step goes (its functions wrapped with
timers, inclusive; the wrappers add a little each).
"""

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import harness
from decode_throughput import make_prompts

FIGURES = {"step_us": "wall us/step", "cpu_us": "main thread CPU us/step"}
PROMPT = 16       # tokens of each sequence's prompt (prefilled outside the timing)
MAX_POSITION = 400  # sequences freed and prefilled again past this many tokens
# (module, attribute path) of the functions --parts wraps, where the tree has them
PARTS = [
    ("shardmesh.stage_model", "StageModel.validate"),
    ("shardmesh.stage_model", "StageModel.forward"),
    ("shardmesh.models.layers", "RotaryTable.rows_at"),
    ("shardmesh.models.decode_attention", "DecodeTable.of"),
    ("shardmesh.models.decode_layer", "DecodeLayerStep.of"),
    ("shardmesh.models.decode_layer", "DecodeLayerStep.attention_half"),
    ("shardmesh.models.moe", "MoEGate.dispatch"),
    ("shardmesh.models.moe", "combine"),
    ("shardmesh.models.moe_kernel", "gate_dispatch"),
    ("shardmesh.models.moe_kernel", "combine_packed"),
    ("shardmesh.models.moe_kernel", "_combine"),
    ("shardmesh.models.parallel", "moe_block"),
    ("shardmesh.models.layers", "RMSNorm.__call__"),
    ("shardmesh.compute_pool", "parallel_linear"),
    ("shardmesh.kv_cache", "KVCache.reserve"),
    ("shardmesh.kv_cache", "KVCache.commit"),
]


class LentRows:
    """What RemoteExperts.lend(layer) gives moe_block: rows to dispatch into, and the layer's call."""

    def __init__(self, experts: "FlushingExperts"):
        self.experts = experts

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    def rows(self, count: int, width: int, dtype):
        return self.experts.segment_rows(count, width) if str(dtype) == "torch.float32" else None

    async def run(self, groups):
        return await self.experts.run(0, groups)


class FlushingExperts:
    """Identity experts whose call reads `flush_bytes` of memory; the seconds inside run are excluded.

    As over the shared-memory plane, the rows lent to the dispatch and the answer lie in byte
    buffers (a session's segment), read back as tensors by torch.frombuffer and their shape and
    dtype checked (RemoteExperts' work after the call, counted in the step: it is not the flush)."""

    SEGMENT_BYTES = 4 << 20

    def __init__(self, flush_bytes: int):
        import numpy
        self.flush = numpy.ones(max(flush_bytes // 8, 1))  # float64
        self.request = bytearray(self.SEGMENT_BYTES)
        self.answer = bytearray(self.SEGMENT_BYTES)
        self.excluded = 0.0      # seconds of wall time inside the calls (the answer's copy and the flush)
        self.excluded_cpu = 0.0  # and of this thread's CPU time

    def lend(self, layer: int) -> LentRows:
        return LentRows(self)

    def segment_rows(self, count: int, width: int):
        import torch
        return torch.frombuffer(self.request, dtype=torch.float32, count=count * width).view(count, width)

    async def run(self, layer, groups):
        import torch
        from shardmesh.models.packed_rows import PackedRows
        start, cpu = time.perf_counter(), time.thread_time()
        if type(groups) is not PackedRows:  # (the torch path's groups: answered as they are)
            self.flush.sum()
            self.excluded += time.perf_counter() - start
            self.excluded_cpu += time.thread_time() - cpu
            return groups
        rows = groups.rows  # [N, H]
        memoryview(self.answer)[:rows.nbytes] = rows.numpy().tobytes()  # the server's answer lands
        self.flush.sum()
        self.excluded += time.perf_counter() - start
        self.excluded_cpu += time.thread_time() - cpu
        output = torch.frombuffer(self.answer, dtype=torch.float32, count=rows.numel()).view(rows.shape)
        if output.shape != rows.shape or output.dtype != rows.dtype:
            raise ValueError("answer shape")
        return PackedRows(output, groups.experts, groups.counts)


def wrap_parts(seconds: dict, experts: FlushingExperts) -> None:
    """Wrap PARTS (those the tree has) so that each adds its seconds, less the experts', to `seconds`."""
    import importlib
    for module_name, path in PARTS:
        module = importlib.import_module(module_name)
        *owners, name = path.split(".")
        owner = module
        for part in owners:
            owner = getattr(owner, part)
        function = getattr(owner, name, None)
        if function is None:
            continue
        if isinstance(owner.__dict__.get(name) if hasattr(owner, "__dict__") else None, classmethod):
            function = function.__func__
            wrapped = _timed(function, path, seconds, experts)
            setattr(owner, name, classmethod(wrapped))
        else:
            setattr(owner, name, _timed(function, path, seconds, experts))
        for loaded in list(sys.modules.values()):  # names imported elsewhere (from x import f)
            if owners == [] and getattr(loaded, name, None) is function:
                setattr(loaded, name, getattr(owner, name))


def _timed(function, name: str, seconds: dict, experts: FlushingExperts):
    if asyncio.iscoroutinefunction(function):
        async def timed_async(*args, **kwargs):
            start, excluded = time.perf_counter(), experts.excluded
            try:
                return await function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start - (experts.excluded - excluded)
        return timed_async

    def timed(*args, **kwargs):
        start, excluded = time.perf_counter(), experts.excluded
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start - (experts.excluded - excluded)
    return timed


def worker(args) -> int:
    """Serve lines {"batch": B, "steps": n} on stdin with {"step_us": mean, "parts": {...}} on stdout."""
    import torch
    torch.set_num_threads(1)
    from shardmesh import compute_pool
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.sampling import GreedyTokens
    from shardmesh.stage_model import StageBatch, StageModel

    compute_pool.set_threads(args.compute_threads)
    model_dir = harness.checkpoint("small" if args.small else "default", args.cache_dir)
    config = ModelConfig.from_dir(model_dir)
    model = StageModel(config, 0, config.num_layers, CheckpointReader(model_dir))
    experts = FlushingExperts(args.flush_mb << 20)
    seconds: dict[str, float] = {}
    if args.parts:
        wrap_parts(seconds, experts)
    state = {}  # batch -> (ids, positions, next token ids)

    def tokens_of(output) -> list[int]:
        return output.token_ids if isinstance(output, GreedyTokens) else output.argmax(-1).tolist()

    async def prefill(batch: int, first_id: int):
        prompts = make_prompts(config.vocab_size, batch, PROMPT)
        ids = list(range(first_id, first_id + batch))
        step = StageBatch(ids, [0] * batch, [PROMPT] * batch, torch.tensor(sum(prompts, [])), greedy=True)
        return ids, PROMPT, tokens_of(await model.forward(step, experts))

    async def run(batch: int, steps: int) -> dict:
        if batch not in state or state[batch][1] + steps > MAX_POSITION:
            if batch in state:
                model.free(state[batch][0])
            state[batch] = await prefill(batch, 1 + 1000 * batch + state.get(batch, (None, 0))[1])
        ids, position, next_ids = state[batch]
        seconds.clear()
        total, total_cpu, excluded, excluded_cpu = 0.0, 0.0, experts.excluded, experts.excluded_cpu
        for _ in range(steps):
            step = StageBatch(ids, [position] * batch, [1] * batch, torch.tensor(next_ids), greedy=True)
            start, cpu = time.perf_counter(), time.thread_time()
            model.validate(step)
            output = await model.forward(step, experts, validated=True)
            total += time.perf_counter() - start
            total_cpu += time.thread_time() - cpu
            next_ids = tokens_of(output)
            position += 1
        state[batch] = (ids, position, next_ids)
        spent = total - (experts.excluded - excluded)
        spent_cpu = total_cpu - (experts.excluded_cpu - excluded_cpu)
        return {"step_us": spent / steps * 1e6, "cpu_us": spent_cpu / steps * 1e6, "parts": {k: v / steps * 1e6 for k, v in seconds.items()},
                "tokens": next_ids}

    loop = asyncio.new_event_loop()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(loop.run_until_complete(run(request["batch"], request["steps"]))), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=pathlib.Path, help="tree A (the baseline)")
    parser.add_argument("--b", type=pathlib.Path, help="tree B")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=10, help="steps per side and round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--compute-threads", type=int, default=2)
    parser.add_argument("--flush-mb", type=int, default=16, help="MB read inside each expert call")
    parser.add_argument("--parts", action="store_true", help="also time side B's parts (wrapped)")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=harness.DEFAULT_CACHE)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.a is None or args.b is None:
        parser.error("--a and --b are required")
    harness.checkpoint("small" if args.small else "default", args.cache_dir)  # made once, before the workers
    common = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "--compute-threads",
              str(args.compute_threads), "--flush-mb", str(args.flush_mb), "--cache-dir", str(args.cache_dir)]
    common += ["--small"] if args.small else []
    workers = {}
    for side, tree in (("A", args.a), ("B", args.b)):
        env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
        command = common + (["--parts"] if args.parts and side == "B" else [])
        workers[side] = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         cwd=pathlib.Path(__file__).parent)
    try:
        for process in workers.values():
            assert json.loads(process.stdout.readline())["ready"]

        def ask(side: str, batch: int, steps: int) -> dict:
            process = workers[side]
            process.stdin.write(json.dumps({"batch": batch, "steps": steps}) + "\n")
            process.stdin.flush()
            return json.loads(process.stdout.readline())

        load_before = os.getloadavg()[0]
        for batch in args.batches:  # a warm-up round (kernels built, prefill)
            for side in "AB":
                ask(side, batch, 3)
        samples = {(side, batch, figure): [] for side in "AB" for batch in args.batches for figure in FIGURES}
        parts = {batch: [] for batch in args.batches}
        agree = {batch: True for batch in args.batches}
        for round_index in range(args.rounds):
            for batch in args.batches:
                answers = {}
                for side in ("A", "B") if round_index % 2 == 0 else ("B", "A"):
                    answers[side] = ask(side, batch, args.steps)
                    for figure in FIGURES:
                        samples[(side, batch, figure)].append(answers[side][figure])
                parts[batch].append(answers["B"]["parts"])
                agree[batch] &= answers["A"]["tokens"] == answers["B"]["tokens"]
    finally:
        for process in workers.values():
            process.stdin.close()
            process.wait(timeout=60)
    print(f"a stage's decode step on cold caches (flush {args.flush_mb} MB per expert call), "
          f"{args.compute_threads} compute threads, {args.rounds} alternating rounds of {args.steps} steps; "
          f"A {args.a}, B {args.b}; 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    for batch in args.batches:
        for figure, title in FIGURES.items():
            a, b = samples[("A", batch, figure)], samples[("B", batch, figure)]
            qa, qb = statistics.quantiles(a, n=4), statistics.quantiles(b, n=4)
            print(f"batch {batch:2d} {title}: A {statistics.median(a):8.1f} [{qa[0]:.1f}, {qa[2]:.1f}]"
                  f"  B {statistics.median(b):8.1f} [{qb[0]:.1f}, {qb[2]:.1f}]"
                  f"  A/B {statistics.median(a) / statistics.median(b):.3f}"
                  f"  per-round A-B median {statistics.median(x - y for x, y in zip(a, b)):.1f}")
        print(f"batch {batch:2d} same tokens: {agree[batch]}")
        if args.parts and parts[batch]:
            for name in sorted(parts[batch][0], key=lambda n: -statistics.median(p.get(n, 0) for p in parts[batch])):
                print(f"    B {name:40s} {statistics.median(p.get(name, 0.0) for p in parts[batch]):8.1f} us/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
