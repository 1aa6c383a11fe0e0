"""CPU time of a stage's MoE glue per layer: the gate, dispatch and combine of `moe_block` around an
echo expert backend (outputs = the inputs packed into one tensor and split again, as a packed
ComputeExperts reply comes back), default shape (hidden 512, 8 experts, top-2), one torch thread.

    PYTHONPATH=<tree> .venv/bin/python bench/moe_glue.py [--batch 1 16] [--layers 2000] [--flush-mb 32]

`--flush-mb` streams that many MB between layers (as the expert and attention weights do in a real
step), so the glue runs on cold caches as it does in a stage; 0 keeps them warm. Prints the median of
`--rounds` rounds of process CPU time per layer (which other load hardly changes). To compare two
trees, run this file alternately with each tree first on PYTHONPATH (this file needs only
shardmesh.models.parallel.moe_block, shardmesh.models.moe.MoEGate and models.packed_rows.PackedRows).
`--step on off` (a tree with models/moe_step.py): moe_block with a MoEStep shared by each 8 layers, as
a stage's decode step gives it, or without, alternated round by round in this process, with their
ratio. Every call passes the residual, as a stage does. Not a test.
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
        from shardmesh.models.packed_rows import PackedRows
        if type(groups) is PackedRows:  # packed groups: answered as one tensor (a copy), as RemoteExperts does
            return PackedRows(groups.rows.clone(), groups.experts, groups.counts)
        packed = torch.cat(list(groups.values()))  # [N, H]
        return dict(zip(groups, packed.split_with_sizes([x.shape[0] for x in groups.values()])))


async def layers_cpu_us(batch: int, layers: int, flush: torch.Tensor | None, step: bool = False) -> float:
    """CPU microseconds per layer of moe_block at this batch, the flush excluded (timed apart); step:
    with a MoEStep made for each 8 layers (its making timed too)."""
    from shardmesh.models.moe import MoEGate
    from shardmesh.models.parallel import moe_block
    generator = torch.Generator().manual_seed(batch)
    gates = [MoEGate(torch.randn(EXPERTS, HIDDEN, generator=generator) * 0.05, TOP_K) for _ in range(8)]
    hidden_states = torch.randn(batch, HIDDEN, generator=generator)  # [T, H]
    residual = torch.randn(batch, HIDDEN, generator=generator)       # [T, H]
    experts = EchoExperts()
    spent, moe_step = 0.0, None
    for index in range(layers):
        if flush is not None:
            flush.add_(1.0)  # every line of the buffer through the caches
        start = time.process_time()
        if step and index % 8 == 0:
            from shardmesh.models.moe_step import MoEStep
            moe_step = MoEStep(batch, HIDDEN, EXPERTS, TOP_K)
        if moe_step is not None:
            await moe_block(gates[index % 8], hidden_states, experts, index % 8, residual=residual, step=moe_step)
        else:
            await moe_block(gates[index % 8], hidden_states, experts, index % 8, residual=residual)
        spent += time.process_time() - start
    return spent / layers * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--layers", type=int, default=2000, help="moe_block calls timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flush-mb", type=int, default=32)
    parser.add_argument("--step", nargs="+", default=["off"], choices=["on", "off"],
                        help="moe_block with a MoEStep per 8 layers (models/moe_step.py) or without")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    flush = torch.zeros(args.flush_mb * 2**18) if args.flush_mb else None  # float32: 4 bytes each
    samples: dict[tuple[int, str], list[float]] = {(batch, step): [] for batch in args.batch for step in args.step}
    asyncio.run(layers_cpu_us(args.batch[0], 200, flush))  # warm-up
    for _ in range(args.rounds):
        for batch in args.batch:
            for step in args.step:
                samples[(batch, step)].append(asyncio.run(layers_cpu_us(batch, args.layers, flush, step == "on")))
    import shardmesh
    medians = {key: statistics.median(values) for key, values in samples.items()}
    print(f"moe glue, CPU us per layer (median of {args.rounds} rounds of {args.layers} layers, flush "
          f"{args.flush_mb} MB; tree {os.path.dirname(os.path.dirname(shardmesh.__file__))}; "
          f"1-min load {os.getloadavg()[0]:.2f}): "
          + ", ".join(f"batch {batch} step {step} {median:.1f}" for (batch, step), median in medians.items()))
    for batch in args.batch:
        if len(args.step) == 2:
            print(f"batch {batch}: step off / on {medians[(batch, 'off')] / medians[(batch, 'on')]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
