"""Where a stage's own decode step goes, part by part, in process (the stage of a 1-stage mesh).

    .venv/bin/python bench/stage_parts.py [--small] [--batch 1 16] [--compute-threads 1 2]
        [--decode-attention on off] [--decode-layer on off] [--team-lm-head on off] [--moe-kernel on off]
        [--huge-pages on off] [--steps 30]

A StageModel of every layer decodes `--batch` sequences behind an in-process expert backend (an
ExpertShard, its time excluded); the parts of each step are timed with perf_counter marks around
the stage's own callables (norms, the fused q/k/v product, RoPE + cache + SDPA, o_proj, the MoE gate
with dispatch/combine, final norm + LM head; with --decode-layer on, a layer's whole attention half
is one part: models/decode_layer.py), one torch thread, with `--compute-threads` in the
stage's pool (shardmesh.compute_pool) as a stage server would have. Each configuration is run in
alternating rounds; the table shows the median of the rounds' per-step means.
"""

import argparse
import asyncio
import importlib
import itertools
import os
import pathlib
import statistics
import sys
import time
from collections import defaultdict

import torch

import harness
from decode_throughput import make_prompts

# The A/B switches: option -> (column, environment variable read by the tree, module whose cached
# `_function(s)` rereads it; None: read at stage build). Each takes on/off; every combination runs.
SWITCHES = {
    "decode_attention": ("decode attention kernel", "SHARDMESH_DECODE_ATTENTION", "decode_attention"),
    "decode_layer": ("decode layer kernel", "SHARDMESH_DECODE_LAYER", "decode_layer"),
    "team_lm_head": ("LM head on the team", "SHARDMESH_TEAM_LINEAR", None),
    "moe_kernel": ("MoE glue kernel", "SHARDMESH_MOE_KERNEL", "moe_kernel"),
}
COLUMNS = [("batch", "batch"), ("threads", "compute threads"),
           *((name, column) for name, (column, _, _) in SWITCHES.items()), ("huge", "huge pages"),
           ("part", "part"), ("per_step_ms", "ms per step"), ("share", "share of the stage's step")]


class Timer:
    """Accumulates seconds per part name; `wrap` times a callable under a name."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed

    def wrap_async(self, name: str, function, exclude: str):
        async def timed(*args, **kwargs):
            start, excluded = time.perf_counter(), self.seconds[exclude]
            try:
                return await function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start - (self.seconds[exclude] - excluded)
        return timed


class TimedExperts:
    def __init__(self, backend, timer: Timer):
        self.backend, self.timer = backend, timer

    async def run(self, layer, groups):
        start = time.perf_counter()
        try:
            return await self.backend.run(layer, groups)
        finally:
            self.timer.seconds["experts (excluded)"] += time.perf_counter() - start


def instrument(stage, timer: Timer) -> None:
    """Wrap the stage's parts in `timer` (the attention's projections inside its own time)."""
    import shardmesh.stage_model as stage_model
    for layer in stage.layers:
        layer.input_layernorm = timer.wrap("norms", layer.input_layernorm)
        layer.post_attention_layernorm = timer.wrap("norms", layer.post_attention_layernorm)
        attention = layer.self_attn
        attention.qkv_proj = timer.wrap("attention: qkv_proj", attention.qkv_proj)
        attention.o_proj = timer.wrap("attention: o_proj", attention.o_proj)
        call = type(attention).__call__
        layer.self_attn = timer.wrap("attention: all", lambda *a, _self=attention, _call=call: _call(_self, *a))
    stage.norm = timer.wrap("final norm", stage.norm)
    if not hasattr(stage_model, "timed"):  # module functions: wrapped once for every stage
        stage_model.timed = True
        stage_model.moe_block = timer.wrap_async("gate + dispatch + combine", stage_model.moe_block,
                                                 "experts (excluded)")
        stage_model.parallel_linear = timer.wrap("LM head", stage_model.parallel_linear)
        step_class = stage_model.DecodeLayerStep
        step_class.attention_half = timer.wrap("attention half (decode layer kernel)", step_class.attention_half)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--compute-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--decode-attention", nargs="+", default=["on", "off"], choices=["on", "off"],
                        help="attention of one-token sequences in the C kernel (models/decode_attention.py) or SDPA")
    parser.add_argument("--decode-layer", nargs="+", default=["on", "off"], choices=["on", "off"],
                        help="a decode step's attention half of each layer in one threaded C call "
                             "(models/decode_layer.py: SHARDMESH_DECODE_LAYER) or the torch path")
    parser.add_argument("--team-lm-head", nargs="+", default=["on"], choices=["on", "off"],
                        help="the LM head at 1-16 rows on the kernels' team (SHARDMESH_TEAM_LINEAR) or on the "
                             "compute pool's Python threads")
    parser.add_argument("--moe-kernel", nargs="+", default=["on"], choices=["on", "off"],
                        help="the MoE gate/dispatch/combine in the C kernel (models/moe_kernel.py) or torch")
    parser.add_argument("--huge-pages", nargs="+", default=["on"], choices=["on", "off"],
                        help="the stage's weights in huge pages (shardmesh.huge_pages) or where they were loaded")
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", type=pathlib.Path, default=harness.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    shape = "small" if args.small else "default"
    model_dir = harness.checkpoint(shape, args.cache_dir)
    torch.set_num_threads(1)

    from shardmesh import compute_pool, huge_pages
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.expert_model import ExpertShard, LocalExperts
    from shardmesh.stage_model import StageBatch, StageModel

    config = ModelConfig.from_dir(model_dir)
    reader = CheckpointReader(model_dir)
    timer = Timer()
    stages = {}
    for huge in args.huge_pages:
        os.environ["SHARDMESH_HUGE_PAGES"] = "1" if huge == "on" else "0"
        huge_pages._madvise.cache_clear()
        stages[huge] = StageModel(config, 0, config.num_layers, reader)
        instrument(stages[huge], timer)
    experts = TimedExperts(LocalExperts([ExpertShard(
        config, [(l, e) for l in range(config.num_layers) for e in range(config.num_experts)], reader)]), timer)

    async def decode(stage, batch_size: int, first_id: int) -> dict:
        prompts = make_prompts(config.vocab_size, batch_size, 16)
        ids = list(range(first_id, first_id + batch_size))
        batch = StageBatch(ids, [0] * batch_size, [16] * batch_size, torch.tensor(sum(prompts, [])))
        next_ids = (await stage.forward(batch, experts)).argmax(-1)
        for step in range(3):  # warm-up
            batch = StageBatch(ids, [16 + step] * batch_size, [1] * batch_size, next_ids)
            next_ids = (await stage.forward(batch, experts)).argmax(-1)
        timer.seconds.clear()
        start = time.perf_counter()
        for step in range(3, 3 + args.steps):
            batch = StageBatch(ids, [16 + step] * batch_size, [1] * batch_size, next_ids)
            next_ids = (await stage.forward(batch, experts)).argmax(-1)
        total = time.perf_counter() - start
        stage.free(ids)
        parts = {name: seconds / args.steps for name, seconds in timer.seconds.items()}
        parts["stage step (total - experts)"] = (total - timer.seconds["experts (excluded)"]) / args.steps
        return parts

    samples = defaultdict(list)
    first_id = 1
    names = list(SWITCHES)
    for _ in range(args.rounds):
        for batch_size in args.batch:
            for threads in args.compute_threads:
                for *settings, (huge, stage) in itertools.product(
                        *(getattr(args, name) for name in names), stages.items()):
                    for name, setting in zip(names, settings):
                        _, variable, module = SWITCHES[name]
                        os.environ[variable] = "1" if setting == "on" else "0"
                        if module is not None:
                            loaded = importlib.import_module(f"shardmesh.models.{module}")
                            (getattr(loaded, "_functions", None) or loaded._function).cache_clear()
                    compute_pool.set_threads(threads)
                    for part, seconds in asyncio.run(decode(stage, batch_size, first_id)).items():
                        samples[(batch_size, threads, *settings, huge, part)].append(seconds)
                    first_id += batch_size
    compute_pool.set_threads(1)
    rows = []
    for (batch_size, threads, *settings, huge, part), values in samples.items():
        total = statistics.median(samples[(batch_size, threads, *settings, huge, "stage step (total - experts)")])
        value = statistics.median(values)
        rows.append(dict(batch=batch_size, threads=threads, **dict(zip(names, settings)), huge=huge,
                         part=part, per_step_ms=value * 1e3, share="" if "excluded" in part else f"{value / total:.0%}"))
    rows.sort(key=lambda row: (row["batch"], row["threads"], *(row[name] for name in names), row["huge"],
                               -row["per_step_ms"]))
    header = (f"a stage's decode step by part, {shape} shape, {args.rounds} alternating rounds of {args.steps} "
              f"steps; 1-min load average {os.getloadavg()[0]:.1f}")
    harness.report(f"stage_parts-{shape}", header, rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
