"""A stage's per-step setup of a decode step on cold caches, its two forms alternated in one process.

    .venv/bin/python bench/stage_setup_cold.py [--batches 1 16] [--rounds 300] [--flush-mb 16]

What StageModel._run_layers does before the first layer of a decode step, after a read of
`--flush-mb` MB (as the expert server flushes a stage's caches between its steps), two ways:
- "built": the RoPE rows gathered for the step (RotaryTable.rows_at), a new DecodeTable and a new
  DecodeLayerStep over those rows (the stage before the decode table and step were kept across steps);
- "kept": the RoPE tables whole (RotaryTable.covering, the kernel reads each sequence's row by its
  position) and the table and step of the step before taken again (DecodeTable.of / DecodeLayerStep.of
  with `previous`: the same sequences, updated in place).
Prints per batch the median (and quartiles) of each, in microseconds, and built / kept, with the load.
"""

import argparse
import array
import asyncio
import os
import pathlib
import statistics
import sys
import time

import harness
from stage_step_cold import FlushingExperts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--flush-mb", type=int, default=16)
    parser.add_argument("--compute-threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=pathlib.Path, default=harness.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    import numpy
    import torch
    torch.set_num_threads(1)
    from shardmesh import compute_pool
    from shardmesh.checkpoint import CheckpointReader
    from shardmesh.config import ModelConfig
    from shardmesh.models.decode_attention import DecodeTable
    from shardmesh.models.decode_layer import DecodeLayerStep
    from shardmesh.models.layers import Segment
    from shardmesh.stage_model import StageBatch, StageModel

    compute_pool.set_threads(args.compute_threads)
    model_dir = harness.checkpoint("default", args.cache_dir)
    config = ModelConfig.from_dir(model_dir)
    model = StageModel(config, 0, config.num_layers, CheckpointReader(model_dir))
    flush = numpy.ones(max((args.flush_mb << 20) // 8, 1))
    load_before = os.getloadavg()[0]
    print(f"a decode step's setup on cold caches (flush {args.flush_mb} MB before each), default shape, "
          f"{args.compute_threads} compute threads, {args.rounds} alternating rounds")
    for batch in args.batches:
        ids = list(range(1000 * batch, 1000 * batch + batch))
        prompt = StageBatch(ids, [0] * batch, [16] * batch, torch.randint(0, config.vocab_size, (16 * batch,)))
        asyncio.run(model.forward(prompt, FlushingExperts(1 << 20)))
        segments = [Segment(i, 16, 1) for i in range(batch)]  # [S] one token each at position 16
        buffers = [model.cache.reserve(i, 17) for i in ids]
        layers, workspace = model._decode_layers, model._decode_workspace
        decode = DecodeTable.of(segments, buffers)
        kept = DecodeLayerStep.of(segments, decode, *model.rotary_rows.covering(17), layers, workspace=workspace,
                                  by_position=True)

        def built():
            positions = array.array("q")
            for segment in segments:
                positions.extend(range(segment.start_position, segment.start_position + segment.num_tokens))
            cos, sin = model.rotary_rows.rows_at(positions, 17)
            table = DecodeTable.of(segments, buffers)
            assert DecodeLayerStep.of(segments, table, cos, sin, layers, workspace=workspace) is not None

        def reused():
            table = DecodeTable.of(segments, buffers, decode)
            step = DecodeLayerStep.of(segments, table, *model.rotary_rows.covering(17), layers, workspace=workspace,
                                      previous=kept, by_position=True)
            assert table is decode and step is kept

        samples = {"built": [], "kept": []}
        for _ in range(args.rounds):
            for name, setup in (("built", built), ("kept", reused)):
                flush.sum()
                start = time.perf_counter()
                setup()
                samples[name].append((time.perf_counter() - start) * 1e6)
        model.free(ids)
        figures = {name: (statistics.median(v), statistics.quantiles(v, n=4)) for name, v in samples.items()}
        print(f"batch {batch:2d}: " + "  ".join(f"{name} {median:.1f} us [{q[0]:.1f}, {q[2]:.1f}]"
                                                for name, (median, q) in figures.items())
              + f"  built / kept {figures['built'][0] / figures['kept'][0]:.2f}")
    print(f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
