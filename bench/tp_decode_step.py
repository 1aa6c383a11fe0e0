"""One stage's decode step at T = 1 against T = 2 shard processes (gloo, and the shared-memory
AllReduce), measured in the same run on a seeded dense Llama stage.

    .venv/bin/python bench/tp_decode_step.py [--hidden 1024] [--layers 4] [--batch 8] [--steps 30]

Each shard is a process with one torch thread (as a shard server with --threads 1). A decode step:
`batch` sequences with a 32-token prompt cached each add one token. Prints the median ms per step
and the ratio T=1 ms / T=2 ms (> 1: the split stage is faster). Not a test.
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from shardmesh.checkpoint import CheckpointReader  # noqa: E402
from shardmesh.config import ModelConfig  # noqa: E402
from shardmesh.shm_allreduce import ShmGroup  # noqa: E402
from shardmesh.stage_model import StageBatch, StageModel  # noqa: E402
from shardmesh.tp_group import SINGLE, GlooGroup, free_port  # noqa: E402

PROMPT = 32


def make_model(out_dir: str, hidden: int, layers: int) -> str:
    from shardmesh.checkpoint_maker import make_checkpoint

    return str(make_checkpoint(out_dir, "llama", seed=0, vocab_size=512, hidden_size=hidden,
                               intermediate_size=hidden * 11 // 4 // 8 * 8, num_hidden_layers=layers,
                               num_attention_heads=hidden // 64, num_key_value_heads=max(2, hidden // 256)))


def run_steps(model: StageModel, batch_size: int, steps: int, barrier) -> float:
    """Prefill `batch_size` prompts, then time `steps` decode steps; median ms."""
    ids = list(range(batch_size))
    asyncio.run(model.forward(StageBatch(ids, [0] * batch_size, [PROMPT] * batch_size,
                                         torch.randint(3, 500, (batch_size * PROMPT,))), None))
    samples = []
    for step in range(steps):
        batch = StageBatch(ids, [PROMPT + step] * batch_size, [1] * batch_size, torch.randint(3, 500, (batch_size,)))
        barrier()
        start = time.perf_counter()
        asyncio.run(model.forward(batch, None))
        samples.append(time.perf_counter() - start)
    model.free(ids)
    return statistics.median(samples[3:]) * 1e3


def worker(rank: int, world_size: int, model_dir: str, port: int, args, results) -> None:
    torch.set_num_threads(1)
    config = ModelConfig.from_dir(model_dir)
    gloo = GlooGroup(rank, world_size, f"127.0.0.1:{port}", timeout_s=120, name="bench")
    barrier = lambda: gloo.all_reduce(torch.zeros(1))  # noqa: E731
    if world_size == 1:
        results["T=1"] = run_steps(StageModel(config, 0, config.num_layers, CheckpointReader(model_dir), tp=SINGLE),
                                   args.batch, args.steps, barrier)
        return
    for name, group in (("T=2 gloo", gloo), ("T=2 shm", ShmGroup.over(gloo, capacity=1 << 22))):
        model = StageModel(config, 0, config.num_layers, CheckpointReader(model_dir), tp=group)
        elapsed = run_steps(model, args.batch, args.steps, barrier)
        if rank == 0:
            results[name] = elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(tmp, args.hidden, args.layers)
        results = mp.Manager().dict()
        for world_size in (1, 2):
            mp.spawn(worker, args=(world_size, model_dir, free_port(), args, results), nprocs=world_size, join=True)
    base = results["T=1"]
    print(f"decode step of a {args.layers}-layer Llama stage, hidden {args.hidden}, {args.batch} sequences, "
          f"one torch thread per shard ({os.cpu_count()} cores):")
    for name in ("T=1", "T=2 gloo", "T=2 shm"):
        print(f"  {name:<9} {results[name]:8.2f} ms   ratio T=1/this {base / results[name]:5.2f}")


if __name__ == "__main__":
    main()
