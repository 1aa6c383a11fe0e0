"""How long a long prompt stalls the requests already decoding, by prefill chunk size.

    .venv/bin/python bench/prefill_stall.py [--small] [--long-prompt 448] [--chunks 0,64,128]

A mesh (one stage + one expert server, shared memory, real processes) decodes `--decoding`
sequences; once each has a few tokens, one request with a `--long-prompt`-token prompt arrives.
For each router --prefill-chunk-tokens (0 = whole prompts in one step) it reports, for the
decoding sequences, the longest gap between two of their tokens (the stall) and their mean gap
over the whole run, and the long request's time to first token.
"""

import argparse
import asyncio
import os
import pathlib
import sys
import tempfile
import time

import harness
import mesh_configs
from decode_throughput import make_prompts

COLUMNS = [("chunk", "prefill chunk tokens"), ("stall_ms", "longest gap of decoding seqs ms"),
           ("mean_ms", "their mean gap ms"), ("ttft_ms", "long prompt's first token ms")]


async def run(address: str, prompts: list[list[int]], long_prompt: list[int], new_tokens: int) -> dict:
    from shardmesh.client import AsyncClient

    stamps: list[list[float]] = [[] for _ in prompts]
    ready = asyncio.Event()
    async with AsyncClient(address, timeout=600) as client:
        async def decode(i: int):
            async for _ in client.generate(prompts[i], max_new_tokens=new_tokens, ignore_eos=True):
                stamps[i].append(time.perf_counter())
                if all(len(s) >= 4 for s in stamps):
                    ready.set()

        async def long_request() -> float:
            await ready.wait()
            start = time.perf_counter()
            async for _ in client.generate(long_prompt, max_new_tokens=1, ignore_eos=True):
                return time.perf_counter() - start

        *_, ttft = await asyncio.gather(*(decode(i) for i in range(len(prompts))), long_request())
    gaps = [b - a for s in stamps for a, b in zip(s[1:], s[2:])]
    return dict(stall_ms=max(gaps) * 1e3, mean_ms=sum(gaps) / len(gaps) * 1e3, ttft_ms=ttft * 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--long-prompt", type=int, default=448)
    parser.add_argument("--decoding", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--chunks", default="0,64,128")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=harness.DEFAULT_CACHE)
    args = parser.parse_args(argv)
    shape = "small" if args.small else "default"
    model_dir = harness.checkpoint(shape, args.cache_dir)
    from shardmesh.config import ModelConfig
    from shardmesh.launcher import Launcher
    config = ModelConfig.from_dir(model_dir)
    prompts = make_prompts(config.vocab_size, args.decoding, 16)
    long_prompt = make_prompts(config.vocab_size, 1, args.long_prompt, seed=1)[0]
    mesh = mesh_configs.MeshConfig(1, 1, data_plane="shm")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        topology = mesh.write(pathlib.Path(workdir) / "topology.toml", config)
        for chunk in (int(c) for c in args.chunks.split(",")):
            service_args = dict(mesh.service_args)
            service_args["router"] = service_args["router"] + ["--prefill-chunk-tokens", str(chunk)]
            with Launcher(model_dir, topology, threads_per_service=mesh.thread_counts, service_args=service_args,
                          no_auth=True) as launcher:
                asyncio.run(run(launcher.router_address, prompts, long_prompt[:32], 4))  # warm-up
                rows.append(dict(chunk=chunk or "whole prompt",
                                 **asyncio.run(run(launcher.router_address, prompts, long_prompt, args.new_tokens))))
            print(harness.format_table(rows[-1:], COLUMNS), flush=True)
    text = (f"{args.decoding} sequences decoding while a {args.long_prompt}-token prompt arrives, {shape} shape, "
            f"1 stage + 1 expert server (shm); 1-min load average {os.getloadavg()[0]:.1f}\n\n"
            + harness.format_table(rows, COLUMNS))
    print("\n" + text)
    print(f"\nwritten to {harness.save(f'prefill_stall-{shape}', text, dict(rows=rows, argv=sys.argv))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
