"""CPU time of a stage's MoE glue per layer: the gate, dispatch and combine of `moe_block` around an
echo expert backend (outputs = the inputs packed into one tensor and split again, as a packed
ComputeExperts reply comes back), default shape (hidden 512, 8 experts, top-2), one torch thread.

    PYTHONPATH=<tree> .venv/bin/python bench/moe_glue.py [--batch 1 16] [--layers 2000] [--flush-mb 32]

`--flush-mb` streams that many MB between layers (as the expert and attention weights do in a real
step), so the glue runs on cold caches as it does in a stage; 0 keeps them warm. Prints the median of
`--rounds` rounds of process CPU time per layer (which other load hardly changes). To compare two
trees, run this file alternately with each tree first on PYTHONPATH (this file needs only
shardmesh.models.parallel.moe_block and shardmesh.models.moe.MoEGate). Not a test.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time

import torch

HIDDEN, EXPERTS, TOP_K = 512, 8, 2


class EchoExperts:
    """An ExpertBackend whose experts are the identity, answering as a packed reply would: one tensor
    [N, H] (a copy) split into each group's rows."""

    async def run(self, layer: int, groups: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        packed = torch.cat(list(groups.values()))  # [N, H]
        return dict(zip(groups, packed.split_with_sizes([x.shape[0] for x in groups.values()])))


async def layers_cpu_us(batch: int, layers: int, flush: torch.Tensor | None) -> float:
    """CPU microseconds per layer of moe_block at this batch, the flush excluded (timed apart)."""
    from shardmesh.models.moe import MoEGate
    from shardmesh.models.parallel import moe_block
    generator = torch.Generator().manual_seed(batch)
    gates = [MoEGate(torch.randn(EXPERTS, HIDDEN, generator=generator) * 0.05, TOP_K) for _ in range(8)]
    hidden_states = torch.randn(batch, HIDDEN, generator=generator)  # [T, H]
    experts = EchoExperts()
    spent = 0.0
    for index in range(layers):
        if flush is not None:
            flush.add_(1.0)  # every line of the buffer through the caches
        start = time.process_time()
        await moe_block(gates[index % 8], hidden_states, experts, index % 8)
        spent += time.process_time() - start
    return spent / layers * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--layers", type=int, default=2000, help="moe_block calls timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flush-mb", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    flush = torch.zeros(args.flush_mb * 2**18) if args.flush_mb else None  # float32: 4 bytes each
    samples: dict[int, list[float]] = {batch: [] for batch in args.batch}
    asyncio.run(layers_cpu_us(args.batch[0], 200, flush))  # warm-up
    for _ in range(args.rounds):
        for batch in args.batch:
            samples[batch].append(asyncio.run(layers_cpu_us(batch, args.layers, flush)))
    import shardmesh
    print(f"moe glue, CPU us per layer (median of {args.rounds} rounds of {args.layers} layers, flush "
          f"{args.flush_mb} MB; tree {os.path.dirname(os.path.dirname(shardmesh.__file__))}; "
          f"1-min load {os.getloadavg()[0]:.2f}): "
          + ", ".join(f"batch {batch} {statistics.median(values):.1f}" for batch, values in samples.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
