"""The greedy LM head (shardmesh/greedy_head.py) against today's full head + numpy argmax, alternated
in one process, cold (from memory) and warm.

    PYTHONPATH=<tree> .venv/bin/python bench/greedy_head_ab.py [--rows 1,8,16] [--threads 2]
        [--calls 40] [--copies 6] [--vocab 32000] [--hidden 512] [--checkpoint]

Makes `--copies` heads [V, H] (each 65.5 MB fp32 + its packed copies at the issue's shape, in 2 MiB
pages; 6 copies are past the L3 of the machines here) and times calls, each on the next copy
(cold), then the same on copy 0 alone (warm). Sides: full = kernels.linear_team (the stage's LM
head at 1-16 rows, on the team) + greedy_token_ids; int8 = GreedyHead.tokens (AMX-INT8 product,
bound, refinement; the tree at 115c665 also had bf16, the TDPBF16PS head it replaced). The sides'
order alternates call by call. Prints per side the median and 25th percentile wall time, the
full head's median over each side's (> 1: that side faster), the mean and most candidates per
row, whether every call's tokens were its copy's (shardmesh_linear + argmax, computed untimed
beforehand), and the load. x rows are N(0, 1), the heads N(0, 0.05^2), as bench/lm_head_team_ab.py;
--checkpoint takes instead bench/harness.py's default checkpoint's lm_head and its final-normed
hidden states from 12 greedy decode steps of transformers at 16 rows (one copy: warm only).
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

import torch


def checkpoint_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(lm_head [V, H], hidden states [12, 16, H]): the default checkpoint's, after the final norm,
    from 12 greedy steps (full recompute) of transformers on 16 seeded random prompts."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import harness

    model = harness.load_transformers(harness.checkpoint("default"))
    head = model.lm_head.weight.detach().contiguous()
    ids = torch.randint(3, head.shape[0], (16, 6), generator=torch.Generator().manual_seed(1))
    steps = []
    with torch.no_grad():
        for _ in range(12):
            hidden = model.model(ids).last_hidden_state[:, -1].contiguous()  # [16, H]
            steps.append(hidden)
            ids = torch.cat([ids, (hidden @ head.T).argmax(dim=1)[:, None]], dim=1)
    return head, torch.stack(steps)


def run_side(side, kernel, head, greedy, x, threads):
    from shardmesh.sampling import greedy_token_ids

    if side == "full":
        return greedy_token_ids(kernel.linear_team(x, head, threads))
    return greedy[side].tokens(x)


def measure(sides, kernel, heads, greedy, inputs, calls, threads):
    """{side: [ms]}, {side: [candidates]}, agreed: calls rotate over the copies and the inputs."""
    from shardmesh.sampling import greedy_token_ids

    expected = {(c, i): greedy_token_ids(kernel.linear(x, heads[c])) for c in range(len(heads))
                for i, x in enumerate(inputs)}
    wall, candidates, agreed, copy = {side: [] for side in sides}, {side: [] for side in sides}, True, 0
    for call in range(calls + 4):
        x_index = call % len(inputs)
        order = sides[call % len(sides):] + sides[:call % len(sides)]
        for side in order:
            start = time.perf_counter()
            tokens = run_side(side, kernel, heads[copy], greedy[copy], inputs[x_index], threads)
            elapsed = time.perf_counter() - start
            agreed &= tokens == expected[(copy, x_index)]
            if side != "full":
                candidates[side].extend(greedy[copy][side].last_candidates)
            copy = (copy + 1) % len(heads)
            if call >= 4:
                wall[side].append(elapsed * 1e3)
    return wall, candidates, agreed


def report(label, sides, wall, candidates, agreed):
    full = statistics.median(wall["full"]) if "full" in wall else None
    parts = []
    for side in sides:
        median, quartile = statistics.median(wall[side]), statistics.quantiles(wall[side], n=4)[0]
        text = f"{side} {median:.3f} ms (p25 {quartile:.3f})"
        if full is not None and side != "full":
            text += f" full/{side} {full / median:.2f}x, cand/row {statistics.mean(candidates[side]):.2f} " \
                    f"(max {max(candidates[side])})"
        parts.append(text)
    print(f"{label}: " + "; ".join(parts) + f"; tokens agree: {agreed}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--checkpoint", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from shardmesh import compute_pool, kernels
    from shardmesh.greedy_head import GreedyHead
    from shardmesh.huge_pages import to_huge_pages

    compute_pool.set_threads(args.threads)
    kernel = kernels.kernel()
    sides = ["full", "int8"]
    generator = torch.Generator().manual_seed(0)
    if args.checkpoint:
        head, hidden_states = checkpoint_inputs()
        heads = to_huge_pages([head])
    else:
        heads = to_huge_pages([torch.randn(args.vocab, args.hidden, generator=generator) * 0.05
                               for _ in range(args.copies)])
    greedy = [{"int8": GreedyHead.of(head)} for head in heads]
    if any(g is None for g in greedy[0].values()):
        print("no greedy head here (no AMX, or SHARDMESH_GREEDY_HEAD=0)")
        return 1
    vocab, hidden = heads[0].shape
    print(f"LM head [{vocab}, {hidden}] x {len(heads)} copies, sides {sides}, {args.threads} threads", flush=True)
    for rows in (int(r) for r in args.rows.split(",")):
        if args.checkpoint:
            inputs = [step[:rows].contiguous() for step in hidden_states]  # the checkpoint's rows
        else:
            inputs = [torch.randn(rows, hidden, generator=generator)]  # [rows, H]
        if len(heads) > 1:
            report(f"rows {rows:2d} cold", sides, *measure(sides, kernel, heads, greedy, inputs, args.calls, args.threads))
        report(f"rows {rows:2d} warm", sides, *measure(sides, kernel, heads[:1], greedy[:1], inputs, args.calls,
                                                         args.threads))
    print(f"load: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
